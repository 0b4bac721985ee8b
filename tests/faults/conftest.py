"""Each stage (module-scoped: a module's tests of one stage share its data and runs), its
data, and the process runs are forked from."""

import pytest

from tests.faults import runs


@pytest.fixture(scope="module", params=runs.STAGES)
def stage(request):
  return request.param


@pytest.fixture(scope="module")
def prepared(stage, tmp_path_factory):
  return runs.prepare(stage, tmp_path_factory.mktemp(f"prepared_{stage}"))


@pytest.fixture(scope="module")
def zygote():
  z = runs.Zygote()
  yield z
  z.close()
