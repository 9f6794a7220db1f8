import sys

from artefact.cli import main

sys.exit(main())
