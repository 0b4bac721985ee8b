"""The guide's runnable blocks: ```{.python .run} blocks run in order in one namespace per
chapter, and a ```{.text .output} block right after one holds what it prints.

python -m tests.docs.guide [--write] [chapter.md ...]: runs the chapters and reports the
blocks whose output differs, or (--write) writes what they print into the output blocks."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUIDE = os.path.join(ROOT, "docs", "guide")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def chapters() -> list[str]:
  return sorted(os.path.join(GUIDE, f) for f in os.listdir(GUIDE) if re.match(r"\d\d-.*\.md$", f))


def blocks(text: str) -> list[dict]:
  """Every fenced block: its classes ({.python .run} -> {'python', 'run'}), code, span, line."""
  out = []
  for m in FENCE.finditer(text):
    info = m.group(1).strip()
    classes = (
      set(re.findall(r"\.([\w-]+)", info)) if info.startswith("{") else set(info.split()[:1])
    )
    line = text.count("\n", 0, m.start()) + 1
    out.append({"classes": classes, "code": m.group(2), "span": m.span(2), "line": line})
  return out


def run(path: str) -> list[tuple[dict | None, str, dict]]:
  """(output block or None, what the run block printed, the run block) per run block."""
  with open(path, encoding="utf-8") as f:
    items = blocks(f.read())
  namespace: dict = {"__name__": "__guide__"}
  results = []
  for i, block in enumerate(items):
    if "run" not in block["classes"]:
      continue
    printed = io.StringIO()
    code = compile(block["code"], f"{os.path.relpath(path, ROOT)}:{block['line'] + 1}", "exec")
    with contextlib.redirect_stdout(printed):
      exec(code, namespace)
    after = items[i + 1] if i + 1 < len(items) and "output" in items[i + 1]["classes"] else None
    results.append((after, printed.getvalue(), block))
  return results


def write(path: str) -> None:
  """Writes what each run block prints into the output block after it."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  for output, printed, _ in sorted(run(path), key=lambda r: -(r[0] or {"span": (0, 0)})["span"][0]):
    if output is not None:
      start, end = output["span"]
      text = text[:start] + printed + text[end:]
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def main(argv: list[str]) -> int:
  paths = [a for a in argv if a.endswith(".md")] or chapters()
  bad = 0
  for path in paths:
    if "--write" in argv:
      write(path)
      continue
    for output, printed, block in run(path):
      if output is not None and output["code"] != printed:
        bad += 1
        print(f"{path}:{block['line']}: printed {printed!r}, the guide shows {output['code']!r}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(main(sys.argv[1:]))
