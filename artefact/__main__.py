from artefact.cli import main
from artefact.heap import exit_process

exit_process(main())
