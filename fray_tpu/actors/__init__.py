"""Actors and the controller service: authenticated, encrypted calls between the processes of
one controller (driver, CPU jobs, actors, tasks on TPU hosts)."""
