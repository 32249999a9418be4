"""``python -m keras_rebuild``: the ``keras-rebuild`` command line (``python -m keras_rebuild demo``)."""
import sys

from keras_rebuild.cli import main

if __name__ == "__main__":
    sys.exit(main())
