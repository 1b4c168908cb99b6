"""Planning a cluster run on one machine: ``pretrain_moe.py --dry-run --world-size N``.

Modules: :mod:`.world` (torch's fake process group for one simulated rank), :mod:`.simulate`
(the rank built through the engine on the meta device; one micro-batch of each piece on fake
tensors), :mod:`.trace` (bytes saved for backward, collectives of a piece), :mod:`.comm` (payload
bytes of every collective, also used on real runs), :mod:`.schedule` (micro-batches in flight,
bubble), :mod:`.flops`, :mod:`.estimate` (memory, communication, step time of a rank),
:mod:`.report` (table, verdicts), :mod:`.dry_run` (the command).
"""
