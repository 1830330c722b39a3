"""The operator's side: the ``fray-tpu`` CLI (``cli``), garbage collection of leaked resources
(``gc``) and the pre-flight plan report (``plan_report``). Each asks the module that owns a
concept (zones, specs, costs, statuses) rather than re-implementing it."""
