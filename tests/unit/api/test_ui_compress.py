"""The dashboard's compress-to-budget choice: the goal fields of the upload and rerun forms,
their validation (inline, named like the API's 422), and the job page's outcome card."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from tests.unit.api.conftest import ALICE
from tests.unit.api.test_ui import login, upload, wait_for

# A one-second search: the input model and the first candidate of each round only.
QUICK = {"max_drop": "50", "max_time_s": "1"}


def field_error(page: str, form: str, name: str) -> str:
    """The inline message shown under one field of one form, or '' when there is none."""
    match = re.search(rf'<p id="{form}-{name}-error" class="field-error"[^>]*>([^<]*)</p>', page)
    return match.group(1) if match else ""


def test_the_upload_page_offers_the_goal_fields_with_the_apis_bounds_and_defaults(ui) -> None:
    login(ui)
    page = ui.get("/ui/upload").text
    fieldset = page.split('id="new-goal"', 1)[1].split("</fieldset>", 1)[0]
    max_drop = re.search(r'<input id="new-max_drop"[^>]*>', fieldset, re.S)
    assert max_drop is not None
    assert 'min="0"' in max_drop.group(0) and 'max="100"' in max_drop.group(0)
    assert 'value="1.0"' in max_drop.group(0)  # the preset's max drop
    max_time = re.search(r'<input id="new-max_time_s"[^>]*>', fieldset, re.S)
    assert max_time is not None and 'value="600.0"' in max_time.group(0)
    assert "min=" not in max_time.group(0)  # > 0 is exclusive: the server says so by name
    enums = {"drop_kind": ["absolute", "relative"], "objective": ["size", "latency", "energy"]}
    for name, choices in enums.items():
        select = fieldset.split(f'id="new-{name}"', 1)[1].split("</select>", 1)[0]
        assert re.findall(r'<option value="([^"]+)"', select) == choices
    # Only the goal preset's option says so; the script shows the fieldset for that one.
    assert re.findall(r'<option value="([^"]+)"[^>]*data-goal="1"', page) == ["compress-to-budget"]
    script = ui.get("/ui/static/upload.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "fieldset.disabled" in script.text


def test_the_form_goal_starts_a_goal_job_and_the_page_shows_the_winner(
    ui, torch_model_bytes
) -> None:
    csrf = login(ui)
    fields = {"preset": "compress-to-budget", "profile": "mobile", **QUICK}
    fields.update(drop_kind="relative", objective="latency")
    started = upload(ui, csrf, torch_model_bytes, name="mlp.pt", **fields)
    assert started.status_code == 303, started.text
    job_id = started.headers["location"].rsplit("/", 1)[-1]
    job = wait_for(ui, job_id)
    assert job["status"] == "COMPLETED", job["reason"]
    assert job["profile"] == "mobile"  # the goal's profile is the job's
    assert job["steps"] == [
        {
            "name": "compress",
            "params": {
                "max_drop": 50.0,
                "drop_kind": "relative",
                "objective": "latency",
                "max_time_s": 1.0,
            },
        }
    ]
    record = job["records"][0]
    winner = record["metrics"]["winner"]

    page = ui.get(f"/ui/jobs/{job_id}").text
    card = page.split('id="compress-result"', 1)[1].split("</section>", 1)[0]
    assert 'data-met="true"' in card and "goal met" in card
    shown = re.search(r'<dd id="compress-winner">([^<]*)</dd>', card)
    assert shown is not None and html.unescape(shown.group(1)) == winner["label"]
    assert "profile mobile" in card and "50.0 % (relative)" in card and "minimize latency" in card
    assert f"{winner['size_ratio']:.1f}x smaller" in card
    assert f"{-winner['drop_pt']:+.2f} pt against the input" in card  # a gain reads "+"
    report_href = re.search(r'id="compress-report" href="([^"]+)"', card)
    model_href = re.search(r'id="compress-model" href="([^"]+)"', card)
    assert report_href is not None and model_href is not None

    report = ui.get(report_href.group(1))
    assert report.status_code == 200
    assert "default-src 'none'" in report.headers["content-security-policy"]
    assert "Compress to budget" in report.text and winner["label"] in html.unescape(report.text)
    model = ui.get(model_href.group(1).replace("&amp;", "&"))
    assert model.status_code == 200
    assert 'filename="model.onnx"' in model.headers["content-disposition"]
    assert len(model.content) == record["output_size"]
    chain = re.search(r'<img id="compress-chain"[^>]* src="([^"]+)"', card)
    assert chain is not None
    assert ui.get(chain.group(1).replace("&amp;", "&")).content.startswith(b"\x89PNG")
    # The job's own Pareto plot draws every candidate the search gated, not one point.
    from api.ui.plots import plot_points

    labels = [p["label"] for p in plot_points(job["records"])["pareto"]]
    assert winner["label"] in labels and "input" in labels
    assert ui.get(f"/ui/jobs/{job_id}/plots/pareto.png").content.startswith(b"\x89PNG")
    # Another step's report, or another user's job, is not there.
    assert ui.get(f"/ui/jobs/{job_id}/steps/5/report").status_code == 404
    ui.cookies.clear()
    login(ui, "bob-key-00002")
    assert ui.get(report_href.group(1)).status_code == 404


def test_a_goal_nobody_meets_shows_the_best_so_far_marked_as_such(ui, torch_model_bytes) -> None:
    # The dashboard offers built-in profiles only; an impossible inline budget comes by the API.
    login(ui)
    model_id = ui.post("/v1/models", headers=ALICE, files={"file": ("m.pt", torch_model_bytes)})
    impossible = {"memory_budget_mb": 1e-6, "compute_scale": 1, "power_w": 1}
    body = {"model_id": model_id.json()["id"], "goal": {"profile": impossible, "max_time_s": 1}}
    job_id = ui.post("/v1/jobs", headers=ALICE, json=body).json()["id"]
    assert wait_for(ui, job_id)["status"] == "REJECTED"
    page = ui.get(f"/ui/jobs/{job_id}").text
    card = page.split('id="compress-result"', 1)[1].split("</section>", 1)[0]
    assert 'data-met="false"' in card and "goal not met" in card
    assert "<dt>best so far</dt>" in card and "no candidate met the goal" in card
    assert 'id="compress-report"' in card
    # The step keeps its best-so-far ONNX; the page says it is not the goal's.
    assert re.search(r'id="compress-model"[^>]*>model.onnx</a> \(the best so far: it misses', card)


@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        ({"max_drop": "-1"}, "max_drop", "goal.max_drop: Input should be greater than or equal"),
        ({"max_drop": "abc"}, "max_drop", "goal.max_drop: Input should be a valid number"),
        ({"max_drop": "nan"}, "max_drop", "goal.max_drop: Input should be less than or equal"),
        ({"max_time_s": "0"}, "max_time_s", "goal.max_time_s: Input should be greater than 0"),
        ({"drop_kind": "sideways"}, "drop_kind", "goal.drop_kind: Input should be 'absolute'"),
        ({"objective": "speed"}, "objective", "goal.objective: Input should be 'size', 'latency'"),
        ({"profile": "nope"}, "profile", "goal.profile: unknown profile 'nope'"),
    ],
)
def test_a_bad_goal_value_is_a_422_shown_beside_its_field_and_stores_nothing(
    ui, ui_settings, torch_model_bytes, fields, field, needle
) -> None:
    csrf = login(ui)
    given = {"preset": "compress-to-budget", **QUICK, **fields}
    refused = upload(ui, csrf, torch_model_bytes, name="mlp.pt", **given)
    assert refused.status_code == 422, refused.text
    page = refused.text
    assert field_error(page, "new", field).startswith(needle.replace("'", "&#39;"))
    assert 'role="alert">Check the form: goal.' in page
    # The form comes back as the user left it, the goal choice and the bad value included.
    assert '<option value="compress-to-budget" selected' in page
    if field not in ("drop_kind", "objective", "profile"):
        assert f'value="{fields[field]}"' in page.split(f'id="new-{field}"', 1)[1][:400]
    assert not list(Path(str(ui_settings.store_url)).rglob("meta.json"))
    assert ui.get("/v1/jobs", headers=ALICE).json()["count"] == 0


def test_the_rerun_form_takes_the_goal_and_names_its_bad_fields(ui, torch_model_bytes) -> None:
    csrf = login(ui)
    first = upload(ui, csrf, torch_model_bytes, name="mlp.pt", preset="measure")
    wait_for(ui, first.headers["location"].rsplit("/", 1)[-1])
    model_id = ui.get("/v1/models", headers=ALICE).json()["data"][0]["id"]
    form = {"csrf": csrf, "model_id": model_id, "preset": "compress-to-budget"}
    refused = ui.post("/ui/jobs", data={**form, "max_drop": "101", "max_time_s": "-3"})
    assert refused.status_code == 422
    assert field_error(refused.text, "old", "max_drop").startswith("goal.max_drop: Input should")
    assert field_error(refused.text, "old", "max_time_s").startswith("goal.max_time_s: Input")
    assert field_error(refused.text, "new", "max_drop") == ""  # the other form is untouched
    started = ui.post("/ui/jobs", data={**form, **QUICK, "objective": "energy"})
    assert started.status_code == 303, started.text
    job = wait_for(ui, started.headers["location"].rsplit("/", 1)[-1])
    assert job["status"] == "COMPLETED", job["reason"]
    assert job["steps"][0]["params"]["objective"] == "energy"


def test_goal_fields_are_ignored_by_the_other_presets(ui, torch_model_bytes) -> None:
    # A browser sends no goal fields for them (the fieldset is disabled); without script
    # it does, and the legend says they belong to compress-to-budget only.
    csrf = login(ui)
    started = upload(ui, csrf, torch_model_bytes, name="mlp.pt", preset="measure", max_drop="-1")
    assert started.status_code == 303, started.text
    job = wait_for(ui, started.headers["location"].rsplit("/", 1)[-1])
    assert [s["name"] for s in job["steps"]] == ["measure", "report"]
    assert 'id="compress-result"' not in ui.get(f"/ui/jobs/{job['id']}").text
