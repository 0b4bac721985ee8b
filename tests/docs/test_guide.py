"""The guide (docs/guide/): every runnable block runs and prints what the guide shows; the
Markdown parses, and every link, figure and code reference (`path.py:function`) resolves."""

import os
import re

import pytest

from tests.docs import guide

CODE_REF = re.compile(r"`((?:model|data|train|rlhf|configs|bench|tests)/[\w/.-]+\.py)(?::(\w+))?`")
DOC_REF = re.compile(r"\b(docs/[\w/.-]+\.md)\b")
CHAPTERS = [os.path.basename(p) for p in guide.chapters()]


def test_there_is_a_chapter_for_every_part():
  assert len(CHAPTERS) == 10, CHAPTERS


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_runnable_blocks_run_and_print_what_the_guide_shows(chapter):
  results = guide.run(os.path.join(guide.GUIDE, chapter))
  assert results, f"{chapter} has no runnable block"
  for output, printed, block in results:
    assert output is not None, f"{chapter}:{block['line']}: a runnable block shows no output"
    assert printed == output["code"], f"{chapter}:{block['line']}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_markdown_parses_and_every_reference_resolves(chapter):
  from markdown_it import MarkdownIt

  path = os.path.join(guide.GUIDE, chapter)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  tokens = MarkdownIt("commonmark").parse(text)
  assert tokens and tokens[0].type == "heading_open" and tokens[0].tag == "h1", chapter
  targets = []
  for token in tokens:
    for child in [token, *(token.children or [])]:
      if child.type in ("link_open", "image"):
        targets.append(child.attrs.get("href") or child.attrs.get("src"))
  for target in targets:
    if re.match(r"[a-z]+:|#", target):
      continue
    assert os.path.exists(os.path.join(guide.GUIDE, target)), f"{chapter}: {target} is missing"
  for file, name in CODE_REF.findall(text):
    where = os.path.join(guide.ROOT, file)
    assert os.path.exists(where), f"{chapter}: {file} does not exist"
    if name:
      with open(where, encoding="utf-8") as f:
        source = f.read()
      assert re.search(rf"^\s*(def|class) {name}\b|^{name} = ", source, re.M), (
        f"{chapter}: {file} defines no {name}"
      )
  for doc in DOC_REF.findall(text):
    assert os.path.exists(os.path.join(guide.ROOT, doc)), f"{chapter}: {doc} does not exist"
