"""One supervisor thread per job, in the order a job moves through it:

- ``job``: the per-job loop (attempt → verdict → decide → finish or retry);
- ``slices``: acquisition (journal first, then create; restored on reattach) and release;
- ``gang``: the agents of the slices (connect, upload, prepare, start or resume, cancel, leases,
  liveness);
- ``attempt``: one running attempt (a bounded buffer fed by one reader per host) followed into
- ``watch``: the gang watch, a pure state machine deciding when the attempt stops and how each
  task ended;
- ``tpu`` / ``local``: the two kinds of job (gangs on slices, CPU replicas here);
- ``records``: what the controller knows of each job (status, tasks, counters, output ring).

Pure policies (unit-tested without threads): ``phases`` (the phase machine), ``capacity`` (how
long to wait for capacity), ``watch``, ``fray_tpu.decisions`` (verdicts and retries) and
``fray_tpu.placement`` (one zone per attempt's slices, hosts in worker order).
"""
