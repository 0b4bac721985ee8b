"""How the absl command-line tools (train.main, train.sample, train.chat, train.plan) end on a
user error: one line naming the problem on stderr and exit status 1, no traceback unless
--debug or FROMSCRATCH_DEBUG=1 asks for one.

A user error is a ValueError, OSError or FloatingPointError raised by this project's code (its
DataError, ConversionError, PartitionError, ConfigMismatch, RewardError, CheckpointError,
NonFiniteError and validation: each message names the file, field or value at fault), or an
OSError naming a file. Anything else, and anything raised inside a library, is a bug and keeps
its traceback. Flags and config files are checked here, before anything runs: an unknown flag,
a bad value, a missing config file, an error inside one (its file and line), and a
`--config.a.b` override naming no field (with the field's neighbours)."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

DEBUG_ENV = "FROMSCRATCH_DEBUG"
USER_ERRORS = (ValueError, OSError, FloatingPointError)
_DEBUG = flags.DEFINE_bool("debug", False, f"show an error's traceback (or set {DEBUG_ENV}=1)")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(
  os.path.join(_REPO, d) + os.sep for d in ("model", "data", "train", "rlhf", "configs")
)


def run(main) -> None:
  """app.run(main), with a user error ending in one line (see the module docstring)."""
  held = None if debug() else _HeldBack.install()
  try:
    app.run(main, flags_parser=_parse_flags)
  except BaseException as e:  # app.run ends in SystemExit when main returns
    if held:
      held.release(unless=e)
    if debug():
      raise
    if isinstance(e, KeyboardInterrupt):
      sys.exit(130)
    if is_user_error(e):
      fail(one_line(e))
    raise


def is_user_error(e: BaseException) -> bool:
  """A bad input, not a bug: a ValueError, OSError or FloatingPointError that this project's
  code raised (its own error classes, or raised in its files: their messages name the input),
  or an OSError naming a file. Anything raised inside a library is left to its traceback."""
  if not isinstance(e, USER_ERRORS):
    return False
  if type(e).__module__.split(".")[0] in ("model", "data", "train", "rlhf"):
    return True
  if isinstance(e, OSError) and e.filename:
    return True
  frames = traceback.extract_tb(e.__traceback__)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OURS)


class _HeldBack:
  """Orbax's log records that carry a traceback, held back while the tool runs. A failed
  save ends in a CheckpointError naming its step, its cause and the checkpoints intact;
  before it, orbax logs that cause with a traceback from each of its threads (hundreds of
  lines). At the end, records the final error does not report are written after all. The
  event loop orbax closes then rejects tensorstore's callbacks: those are dropped."""

  def __init__(self):
    self.records, self.holding = [], True

  @classmethod
  def install(cls) -> _HeldBack:
    held = cls()
    logging.get_absl_handler().addFilter(held.filter)
    default = sys.unraisablehook

    def hook(unraisable):
      if not (
        isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
      ):
        default(unraisable)

    sys.unraisablehook = hook
    return held

  def filter(self, record) -> bool:
    if self.holding and record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
      self.records.append(record)
      return False
    return True

  def release(self, unless: BaseException) -> None:
    self.holding = False
    reported = one_line(unless) if is_user_error(unless) else ""
    for record in self.records:
      if not (reported and one_line(record.exc_info[1]) in reported):
        logging.get_absl_handler().handle(record)


def debug(argv=None) -> bool:
  """--debug (in any form absl takes: the last --debug / --nodebug / --debug=VALUE wins), or
  FROMSCRATCH_DEBUG set to anything but 0/false/no."""
  if os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no"):
    return True
  on = flags.FLAGS.is_parsed() and _DEBUG.value  # a --flagfile's, once parsed
  for arg in sys.argv if argv is None else argv:
    match = re.fullmatch(r"--?(no)?debug(?:=(.*))?", arg)
    if match:
      on = not match.group(1) and (match.group(2) or "true").lower() in ("true", "1", "t", "yes")
  return bool(on)


def fail(message: str) -> None:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  prog = f"python -m {spec.name}" if spec else os.path.basename(sys.argv[0])
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(1)


def one_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return " ".join(lines) or type(e).__name__


def _parse_flags(argv):
  # ml_collections warns of a config file whose get_config() returns None; the error below
  # says so in its line, and absl's note that logging precedes flag parsing goes with it.
  quiet = lambda record: debug(argv) or "ml_collections" not in record.pathname
  logging.get_absl_logger().addFilter(quiet)
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:
    message = _flag_error(e, argv)
    if message is None or debug(argv):
      raise
    fail(message)
  finally:
    logging.get_absl_logger().removeFilter(quiet)
  for name in _config_flags():
    try:  # ml_collections keeps a missing config file's error until the config is first read
      value = flags.FLAGS[name].value
      if value is None and _argument(name, argv) is not None:
        fail(f"--{name}={_argument(name, argv)}: its get_config() returned None")
      if value is not None:
        value.get("", None)
    except OSError as e:
      if debug(argv):
        raise
      fail(f"--{name}={_argument(name, argv)}: cannot load it: {_last_line(str(e))}")
  return rest


def _config_flags() -> list[str]:
  """The names of the config-file flags (ml_collections' flags with a config_filename)."""
  return [name for name in flags.FLAGS if hasattr(type(flags.FLAGS[name]), "config_filename")]


def _argument(name: str, argv) -> str | None:
  """The config file given to --name on the command line (the last one wins, as in absl), or
  the default one."""
  try:
    value = flags.FLAGS[name].config_filename
  except flags.Error:  # not parsed: no default
    value = None
  for i, arg in enumerate(argv):
    match = re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg)
    if match and match.group(1) is not None:
      value = match.group(1)
    elif match and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ""


def define_config(name: str, default: str | None, help_string: str):
  """config_flags.DEFINE_config_file, locked. A default config file is loaded here, with the
  command line's overrides: their errors end here in one line too."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except Exception as e:
    message = _config_error(e, name, default, sys.argv)
    if message is None or debug():
      raise
    fail(message)


def _config_error(e: Exception, name: str, path: str | None, argv) -> str | None:
  """One line for an error in config file `path` or an override of it, else None."""
  if path is None:
    return None
  if isinstance(e, (AttributeError, KeyError)):
    unknown = _unknown_field(name, path, argv)
    if unknown:
      return unknown
  where = _config_line(e, path.split(":", 1)[0])
  if where:  # an error inside the config file
    return f"--{name}={path}: {where}"
  if isinstance(e, OSError):  # the file cannot be loaded, and overrides reached for it
    return f"--{name}={path}: cannot load it: {_last_line(str(e))}"
  return None


def _flag_error(e: Exception, argv) -> str | None:
  """One line for an error raised while parsing the flags (None: not the user's)."""
  for name in _config_flags():
    path = _argument(name, argv)
    message = _config_error(e, name, path, argv)
    if message:
      return message
    if path is not None and flags.FLAGS[name].value is None:  # failed as a required flag
      return f"--{name}={path}: its get_config() returned None"
  if isinstance(e, flags.Error):  # unknown flag, bad value, missing required flag
    return f"{one_line(e)} (--helpfull lists the flags)"
  return None


def _config_line(e: BaseException, config_file: str) -> str | None:
  """'FILE:LINE: Error: message' when `e` was raised inside `config_file`, else None."""
  target = os.path.abspath(config_file)
  text = "".join(traceback.format_exception(e))  # takes in the causes, and tracebacks quoted
  found = re.findall(r'File "([^"]+)", line (\d+)', text)
  lines = [int(n) for f, n in found if os.path.abspath(f) == target]
  if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == target:
    lines.append(e.lineno or 0)
  return f"{config_file}:{lines[-1]}: {_last_line(text)}" if lines else None


def _unknown_field(name: str, path: str, argv) -> str | None:
  """Names the first `--name.a.b` override whose field the config file does not have."""
  try:  # as ml_collections loads it: FILE[:ARG] -> get_config(ARG)
    file, *arg = path.split(":", 1)
    spec = importlib.util.spec_from_file_location("_cli_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*arg)
  except Exception:
    return None
  for arg in argv:
    match = re.match(rf"--?(?:no)?{re.escape(name)}\.([\w.]+)", arg)
    if not match:
      continue
    node, parts = config, match.group(1).split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, config_dict.ConfigDict):
        break
      if part not in node:
        field = ".".join(parts[: i + 1])
        parent = ".".join(parts[:i]) or name
        close = difflib.get_close_matches(part, list(node.keys()), n=1)
        hint = (
          f"did you mean --{name}.{'.'.join([*parts[:i], close[0], *parts[i + 1 :]])}?"
          if close
          else f"{parent} has {', '.join(sorted(node.keys()))}"
        )
        return f"--{name}.{match.group(1)}: {path} has no field {field!r}; {hint}"
      node = node[part]
  return None
