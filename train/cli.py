"""How the absl command-line tools (train.main, train.sample, train.chat, train.plan) end on a
user error: one line naming the problem on stderr and exit status 1, no traceback unless
--debug or FROMSCRATCH_DEBUG=1 asks for one. Bugs (any other exception) keep their traceback.

User errors are ValueError (bad values: the library's DataError, ConversionError,
PartitionError, ConfigMismatch, RewardError), OSError (missing and unreadable files,
CheckpointError) and FloatingPointError (NonFiniteError): every message they carry names the
file, field or value at fault. Flags and config files are checked here, before anything runs:
an unknown flag, a bad value, a missing config file, an error inside one (its file and line),
and a `--config.a.b` override naming no field (with the field's neighbours)."""

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


def run(main) -> None:
  """app.run(main), with a user error ending in one line (see the module docstring)."""
  if not debug():
    _quiet_checkpoint_tracebacks()
  try:
    app.run(main, flags_parser=_parse_flags)
  except USER_ERRORS as e:
    if debug():
      raise
    fail(one_line(e))
  except KeyboardInterrupt:
    if debug():
      raise
    sys.exit(130)


def _quiet_checkpoint_tracebacks() -> None:
  """A failed save ends the run with a CheckpointError naming its step, its cause and the
  checkpoints intact. Before that, orbax logs the same error with a traceback from each of its
  threads, and the event loop it closed rejects tensorstore's callbacks: hundreds of lines."""
  logging.get_absl_handler().addFilter(
    lambda record: not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)
  )
  default = sys.unraisablehook

  def hook(unraisable):
    if not (
      isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"
    ):
      default(unraisable)

  sys.unraisablehook = hook


def debug(argv=None) -> bool:
  argv = sys.argv if argv is None else argv
  return bool(
    os.environ.get(DEBUG_ENV, "") not in ("", "0")
    or "--debug" in argv
    or (flags.FLAGS.is_parsed() and _DEBUG.value)
  )


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
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:
    if debug(argv):
      raise
    fail(_flag_error(e, argv))
  for name in _config_flags():
    try:  # ml_collections keeps a missing config file's error until the config is first read
      flags.FLAGS[name].value.get("", None)
    except OSError as e:
      if debug(argv):
        raise
      fail(f"--{name}={_argument(name, argv)}: cannot load it: {_last_line(str(e))}")
    except AttributeError:  # None: the flag was not given
      pass
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
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
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
    if debug():
      raise
    fail(_config_error(e, name, default, sys.argv) or f"{type(e).__name__}: {one_line(e)}")


def _config_error(e: Exception, name: str, path: str | None, argv) -> str | None:
  """One line for an error in config file `path` or an override of it, else None."""
  if path is None:
    return None
  if isinstance(e, (AttributeError, KeyError)):
    unknown = _unknown_field(name, path, argv)
    if unknown:
      return unknown
  where = _config_line(e, path.split(":", 1)[0])
  return f"--{name}={path}: {where}" if where else None  # an error inside the config file


def _flag_error(e: Exception, argv) -> str:
  """One line for an error raised while parsing the flags."""
  for name in _config_flags():
    message = _config_error(e, name, _argument(name, argv), argv)
    if message:
      return message
  if isinstance(e, flags.Error):  # unknown flag, bad value, missing required flag
    return f"{one_line(e)} (--helpfull lists the flags)"
  return f"{type(e).__name__}: {one_line(e)}"


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
    match = re.match(rf"--(?:no)?{re.escape(name)}\.([\w.]+)", arg)
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
