"""Prompt sets saved by the studio and "apply to cohort": `zeus reprompt` itself (the same code
path, commands/reprompt.py → engine.driver.run_cohort) in a child process, so that its Ray
session never shares the web server's process. Progress is read from the store: the result
markers written under the new prompt key. Results land under their own prompt key; the run the
studio was opened on is not touched."""
from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque

import yaml

from ..prompts import PromptSet, parse_prompt_set, prompt_key
from ..storage.keys import run_key

SAVE_DIR = ("studio", "prompts")   # under the results root, beside (never inside) the runs' folders


def prompt_yaml(ps: PromptSet) -> str:
    """The prompt set as a prompt file (validated again on the way out)."""
    data = ps.model_dump(exclude_none=True)
    data = {k: v for k, v in data.items() if v not in ("", None)}
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
    parse_prompt_set(yaml.safe_load(text), "studio prompt file")
    return text


def save_prompt_set(run, ps: PromptSet, model_key: str) -> str:
    """Write `ps` as <root>/studio/prompts/<name>-<prompt key>.yaml; returns its URI. The name comes
    from the prompt set, reduced to safe characters, so nothing outside that folder is reachable."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", ps.name).strip(".-")[:60] or "prompts"
    key = prompt_key(ps, model_key)[:12]
    path = run.store.path(*SAVE_DIR, f"{name}-{key}.yaml")
    run.store.write_bytes(path, prompt_yaml(ps).encode())
    return run.store.uri(path)


class CohortJob:
    """One `zeus reprompt` child process and its progress."""

    def __init__(self, run, prompt_uri: str, ps: PromptSet, model_key: str, overrides: list[str] | None = None):
        self.run = run
        self.prompt_uri = prompt_uri
        self.key = run_key(prompt_key(ps, model_key), run.cfg)
        self.targets = [f"{r.keys.res_dir.rsplit('/', 1)[0]}/{self.key}"
                        for r in (run.slide(s) for s in run.slide_ids) if r.keys is not None]
        self.lines: deque[str] = deque(maxlen=40)
        self.started = time.time()
        self.finished: float | None = None
        cmd = [sys.executable, "-m", "zeus_ray", "reprompt", "--results", run.store.root_uri, "--prompts", prompt_uri,
               "--model", run.cfg.model.id, "--no-progress", "--set", f"postprocess={run.cfg.postprocess}"]
        for o in overrides or []:
            cmd += ["--set", o]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL, env=dict(os.environ))
        threading.Thread(target=self._read, daemon=True).start()
        atexit.register(self.stop)   # a studio that stops takes its re-prompt along (a re-run resumes it)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
        self.proc.wait()
        self.finished = time.time()

    def status(self) -> dict:
        rc = self.proc.poll() if self.finished else None
        done = sum(1 for d in self.targets if self.run.store.complete(d) is not None)
        summary = next((ln for ln in reversed(self.lines) if ln.startswith("zeus reprompt:")), None)
        # `zeus reprompt` exits 1 when some slides failed (e.g. no stored embeddings); it still finished.
        state = "running" if rc is None else "done" if rc == 0 or (rc == 1 and summary) else "failed"
        errors = [ln for ln in self.lines if ln.startswith(("error:", "failed:", "not re-prompted:"))]
        return {"prompt_key": self.key, "state": state, "returncode": rc, "done": done, "total": len(self.targets),
                "seconds": round((self.finished or time.time()) - self.started, 1), "summary": summary,
                "errors": errors[-5:], "prompt_file": self.prompt_uri}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
