"""`python -m minillm …` (and `torchrun --nproc_per_node=N -m minillm train …`): the `minillm` command."""

from minillm.cli import main

raise SystemExit(main())
