"""Training (layer above evaluation, checkpoint, distributed, attacks, data and models): the run object that wires
every part and owns the checkpoint format (:mod:`.run`), the per-step schedules (:mod:`.schedule`), the loops
(:mod:`.loop`), the objectives, optimizers and controls of the papers (:mod:`.objectives`, :mod:`.optim`,
:mod:`.controls`), stop requests (:mod:`.preempt`) and ``main(cfg)`` (:mod:`.fit`). Imports every layer below it;
nothing below imports it.
"""
