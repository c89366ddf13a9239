"""``python -m projects.blip2.demo``: see ``projects/blip2/demo/run.py``."""
import sys

from projects.blip2.demo.run import main

if __name__ == "__main__":
    main(sys.argv[1:])
