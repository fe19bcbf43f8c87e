"""What a person sees while the cohort runs: on a terminal one live line (slides done/total, tiles/s,
ETA), elsewhere nothing live; per-slide lines go to the log either way. `--no-progress`: neither.

Our own line rather than Ray Data's per-operator bars: an adaptive run is several executions (one
per pass), each of which would draw and tear down its own bars, and slides — not blocks — are what
the user counts. The ETA is the remaining slides at the rate slides have completed so far.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("zeus_ray.engine.driver")


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.redirect = None
        self.total = self.done = self.n_tiles = 0
        self.t0 = time.perf_counter()

    def start(self, total: int) -> None:
        self.total, self.t0 = total, time.perf_counter()
        if not (self.enabled and total and sys.stderr.isatty()):
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
        self.bar = tqdm(total=total, unit="slide", dynamic_ncols=True, leave=False, file=sys.stderr,
                        bar_format="{desc} {bar} {n_fmt}/{total_fmt} slides [{elapsed}<{remaining}]{postfix}",
                        desc="zeus run")
        # Log lines print above the bar instead of through it.
        self.redirect = logging_redirect_tqdm(loggers=[logging.getLogger("zeus_ray")], tqdm_class=tqdm)
        self.redirect.__enter__()

    def tiles(self, n: int) -> None:
        self.n_tiles += n
        if self.bar is not None:
            rate = self.n_tiles / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.n_tiles} tiles, {rate:.1f} tiles/s", refresh=False)
            self.bar.refresh()

    def slide(self, row: dict, quiet: bool = False) -> None:
        """A slide is done (`quiet`: it was complete before this run, no line of its own)."""
        self.done += 1
        if self.enabled and not quiet:
            if row["status"] == "ok":
                dice = f", Dice {row['dice']:.3f}" if row.get("dice") is not None else ""
                log.info("slide %s done: %d tiles, tumour %.2f mm²%s (%d/%d)", row["slide_id"], row["n_tiles"],
                         row["tumour_area_mm2"], dice, self.done, self.total)
            else:
                log.info("slide %s %s (%d/%d)", row["slide_id"], row["status"], self.done, self.total)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.redirect is not None:
            self.redirect.__exit__(None, None, None)
            self.redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
