"""``python -m deblur_lib.notebook``: the main job (every notebook, in order); see ``demo``."""

import sys

from deblur_lib.notebook.demo import main

if __name__ == "__main__":
    sys.exit(main())
