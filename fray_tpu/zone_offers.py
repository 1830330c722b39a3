"""Which zones really offer an accelerator type, from the API (``ListAcceleratorTypes``), cached.

The static generation → zones table (``topology.GENERATION_ZONES``) is the offline default and
the preference order. At plan time each candidate zone is confirmed against the API once per
``ttl``: a zone that stopped offering the type, or that the project may not use, is not tried.
A zone the API cannot answer for now (5xx, timeout) is kept: the create will find out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from google.api_core import exceptions as api_exceptions
from google.cloud import tpu_v2

from fray_tpu.cloud_errors import CreateAction, classify_call_error
from fray_tpu.topology import region_of

log = logging.getLogger(__name__)
_PAGE = 1000


class ZoneOffers:
    def __init__(self, client: tpu_v2.TpuClient, project: str, *, api_timeout: float, ttl: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        self._client = client
        self._project = project
        self._timeout = api_timeout
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, frozenset[str] | None]] = {}  # zone -> (fetched, types; None: unusable)
        self._unusable: dict[str, str] = {}  # zone -> why the project cannot use it
        self._locations: list[str] | None = None  # every zone the project can see

    def _types_in(self, zone: str) -> frozenset[str] | None:
        """The types ``zone`` offers; None when the zone is not for this project; raises on a
        failure that says nothing about the zone."""
        with self._lock:
            cached = self._cache.get(zone)
            if cached is not None and self._clock() - cached[0] < self._ttl:
                return cached[1]
        parent = f"projects/{self._project}/locations/{zone}"
        types: set[str] = set()
        token = ""
        try:
            for _ in range(_PAGE):
                page = self._client.list_accelerator_types(
                    request={"parent": parent, "page_size": _PAGE, "page_token": token}, timeout=self._timeout, retry=None
                )
                types.update(t.type_ for t in page.accelerator_types)
                token = page.next_page_token
                if not token:
                    break
            offered: frozenset[str] | None = frozenset(types)
        except api_exceptions.GoogleAPICallError as error:
            if classify_call_error(error).action not in (CreateAction.SKIP_ZONE, CreateAction.FATAL):
                raise
            log.warning("zone %s is not usable: %s", zone, error.message)
            offered = None
            with self._lock:
                self._unusable[zone] = classify_call_error(error).describe()
        with self._lock:
            self._cache[zone] = (self._clock(), offered)
        return offered

    def discover(self, tpu_type: str, zones: Sequence[str]) -> list[str]:
        """Zones the table lacks, in the regions of ``zones``, that the API says offer
        ``tpu_type`` (ListLocations, then each zone's types): they go after the table's."""
        regions = {region_of(zone) for zone in zones}
        with self._lock:
            known = self._locations
        if known is None:
            listing = self._client.list_locations(
                request={"name": f"projects/{self._project}"}, timeout=self._timeout, retry=None
            )
            known = sorted(location.location_id for location in listing.locations)
            with self._lock:
                self._locations = known
        extra = [z for z in known if region_of(z) in regions and z not in zones]
        return [zone for zone in self.confirm(tpu_type, extra) if self._offers(zone, tpu_type)]

    def _offers(self, zone: str, tpu_type: str) -> bool:
        with self._lock:
            cached = self._cache.get(zone)
        return cached is not None and cached[1] is not None and tpu_type in cached[1]

    def why_not(self, tpu_type: str, zone: str) -> str:
        """Why ``zone`` was dropped for ``tpu_type`` by the last ``confirm``."""
        with self._lock:
            return self._unusable.get(zone) or f"does not offer {tpu_type} (ListAcceleratorTypes)"

    def confirm(self, tpu_type: str, zones: Sequence[str]) -> list[str]:
        """``zones`` (in order) that offer ``tpu_type`` by the API; a zone it cannot answer for
        now stays. Empty when none does."""
        kept = []
        for zone in zones:
            try:
                offered = self._types_in(zone)
            except api_exceptions.GoogleAPICallError as error:
                log.info("could not confirm %s in %s (%s); keeping the zone", tpu_type, zone, error)
                kept.append(zone)
                continue
            if offered is not None and tpu_type in offered:
                kept.append(zone)
            elif offered is not None:
                log.info("%s is not offered in %s by the API; not trying it", tpu_type, zone)
        return kept
