"""Admission: at most `limit` requests in flight; the next one is refused with 429."""

import pytest

from wftool.serve.app import Admission, ApiError


def test_admission_refuses_past_the_limit_and_frees_slots():
    admission = Admission(2)
    admission.enter()
    admission.enter()
    with pytest.raises(ApiError) as refused:
        admission.enter()
    assert refused.value.status == 429 and refused.value.body()["error"]["type"] == \
        "rate_limit_error"
    admission.leave()
    admission.enter()  # a finished request frees its slot
    assert admission.active == 2
