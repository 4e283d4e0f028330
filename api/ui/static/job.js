// Live progress of one job: Server-Sent Events from /v1/jobs/{id}/events, polling
// /ui/jobs/{id}/progress when EventSource is missing or keeps failing. Text is set with
// textContent; the results fragment comes from the server already escaped.
(function () {
  "use strict";
  var root = document.getElementById("job");
  if (!root) { return; }
  var jobId = root.dataset.jobId;
  var terminal = { COMPLETED: 1, FAILED: 1, REJECTED: 1, STOPPED: 1 };
  var progress = document.getElementById("progress");
  var label = document.getElementById("progress-label");
  var statusBox = document.getElementById("job-status");
  var reason = document.getElementById("job-reason");
  var candidates = document.getElementById("candidates");
  var lastDetail = null;
  var lastDone = Number(root.dataset.done);
  var received = 0;
  var asked = 0;
  var shown = 0;

  // Refreshes can answer out of order: an older answer that arrives late is dropped, so the
  // table never goes back to fewer steps. data-results-for says what the table shows.
  function refreshResults(state) {
    var seq = ++asked;
    fetch("/ui/jobs/" + encodeURIComponent(jobId) + "/results", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        if (seq < shown) { return; }
        shown = seq;
        document.getElementById("results").innerHTML = html;
        root.dataset.resultsFor = state;
      })
      .catch(function () { /* the next event retries */ });
  }

  function apply(ev) {
    received += 1;
    root.dataset.events = String(received);
    root.dataset.status = ev.status;
    progress.value = ev.percent;
    progress.textContent = ev.percent + "%";
    var text = ev.percent + "% · " + ev.done + "/" + ev.total + " steps";
    if (ev.current_step) { text += " · running " + ev.current_step; }
    if (ev.detail) { text += " · " + ev.detail; }
    label.textContent = text;
    // What a search reports of itself (one line per candidate) stays listed under the bar.
    if (ev.detail && ev.detail !== lastDetail && candidates) {
      lastDetail = ev.detail;
      var item = document.createElement("li");
      item.textContent = ev.detail;
      candidates.appendChild(item);
      candidates.hidden = false;
      candidates.scrollTop = candidates.scrollHeight;
    }
    var badge = document.createElement("span");
    badge.className = "badge status-" + ev.status.toLowerCase();
    badge.textContent = ev.status;
    statusBox.replaceChildren(badge);
    if (ev.reason) { reason.textContent = ev.reason; reason.hidden = false; }
    (ev.steps || []).forEach(function (s) {
      var li = document.querySelector('#timeline li[data-index="' + s.index + '"]');
      if (li) {
        li.dataset.state = s.state;
        li.querySelector(".state").textContent = s.state;
      }
    });
    if (ev.done !== lastDone || terminal[ev.status]) {
      lastDone = ev.done;
      refreshResults(ev.status + ":" + ev.done);
    }
  }

  function poll() {
    root.dataset.transport = "polling";
    fetch("/ui/jobs/" + encodeURIComponent(jobId) + "/progress", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (ev) {
        apply(ev);
        if (!terminal[ev.status]) { setTimeout(poll, 2000); }
      })
      .catch(function () { setTimeout(poll, 5000); });
  }

  if (terminal[root.dataset.status]) { return; }
  if (!window.EventSource) { poll(); return; }
  var failures = 0;
  var source = new EventSource("/v1/jobs/" + encodeURIComponent(jobId) + "/events");
  source.addEventListener("progress", function (e) { failures = 0; apply(JSON.parse(e.data)); });
  source.addEventListener("end", function (e) { source.close(); apply(JSON.parse(e.data)); });
  source.onerror = function () {
    failures += 1;
    // CLOSED: the browser gave up by itself (an answer that is not a 200 event stream) and
    // will not reconnect, so waiting for a third failure would wait forever.
    if (failures >= 3 || source.readyState === EventSource.CLOSED) { source.close(); poll(); }
  };
})();
