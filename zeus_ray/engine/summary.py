"""What a run did: the one record `zeus run` returns, filled by engine/cohort_run.py from the
pipeline's records as slides finish."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..storage.keys import FAILED, NO_TISSUE, OK


@dataclass
class RunSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    no_tissue: int = 0
    tiles_encoded: int = 0
    seconds: float = 0.0
    rows: list = field(default_factory=list)
    root: str = ""
    prompt_key: str = ""
    read_nodes: set = field(default_factory=set)     # Ray node ids that read tiles
    encode_nodes: set = field(default_factory=set)   # and that encoded them
    tiles_full: int = 0       # adaptive mode: tiles full overlap would have encoded for these slides
    tiles_stored: int = 0     # adaptive mode: tiles encoded so far for these slides (this run and before)
    pass_tiles: dict = field(default_factory=dict)   # pass → tiles encoded in it this run
    timing: dict = field(default_factory=dict)       # stage → [wall s, CPU s] summed over workers
    phases: dict = field(default_factory=dict)       # driver phase → wall seconds (start-up, engine, outputs)
    pool: str = ""
    executions: list = field(default_factory=list)   # per Ray Data execution: pass, items, records, seconds

    @property
    def passes(self) -> int:
        return max(self.pass_tiles, default=0)

    def line(self) -> str:
        rate = self.tiles_encoded / self.seconds if self.seconds else 0.0
        adaptive = (f"; adaptive overlap: {self.tiles_stored} of {self.tiles_full} full-overlap tiles encoded "
                    f"({100 * self.tiles_stored / self.tiles_full:.1f} %) in {self.passes} passes this run"
                    if self.tiles_full else "")
        return (f"zeus run: {self.ok} slides ok ({self.skipped} already complete), {self.no_tissue} without tissue, "
                f"{self.failed} failed; {self.tiles_encoded} tiles encoded in {self.seconds:.1f} s "
                f"({rate:.1f} tiles/s){adaptive}; results in {self.root}")

    def add_timing(self, t: dict | None) -> None:
        for stage, (wall, cpu) in (t or {}).items():
            acc = self.timing.setdefault(stage, [0.0, 0.0])
            acc[0] += wall
            acc[1] += cpu

    def add_tiles(self, pass_no: int, n: int, read_node: str | None, encode_node: str | None) -> None:
        self.tiles_encoded += n
        self.pass_tiles[pass_no] = self.pass_tiles.get(pass_no, 0) + n
        for nodes, node in ((self.read_nodes, read_node), (self.encode_nodes, encode_node)):
            if node is not None and n:
                nodes.add(node)

    def count(self) -> None:
        statuses = [r["status"] for r in self.rows]
        self.ok, self.failed, self.no_tissue = (statuses.count(s) for s in (OK, FAILED, NO_TISSUE))
