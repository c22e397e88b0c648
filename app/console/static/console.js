// The console's only script: local times, the viewer's zone for date filters, a
// confirmation before an action, and the task page's live timeline. Every page works
// without it (times stay in UTC, an action asks on a page of its own, the timeline is
// as of the page load).
(function () {
  "use strict";
  var zone = "UTC";
  try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC"; } catch (e) { /* keep UTC */ }
  function localise() {
    var fmt;
    try {
      fmt = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric",
        hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short" });
    } catch (e) { return; }
    document.querySelectorAll("time[data-local]:not([data-done])").forEach(function (el) {
      var d = new Date(el.getAttribute("datetime"));
      if (isNaN(d.getTime())) { return; }
      el.setAttribute("data-done", "");
      el.title = el.textContent;  // the UTC original, on hover
      el.textContent = fmt.format(d);
    });
    document.querySelectorAll("[data-tz]").forEach(function (el) { el.textContent = zone; });
    document.querySelectorAll("input[data-tz-input]").forEach(function (el) {
      if (!el.value) { el.value = zone; }
    });
  }
  function confirmActions() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { ev.preventDefault(); return; }
        var flag = form.querySelector("input[name=confirmed]");
        if (flag) { flag.value = "1"; }
      });
    });
  }
  var TERMINAL = ["succeeded", "failed", "cancelled", "timed_out"];
  function cell(label, child) {
    var td = document.createElement("td");
    td.setAttribute("data-label", label);
    if (child) { td.appendChild(child); }
    return td;
  }
  function span(cls, text) {
    var el = document.createElement("span");
    el.className = cls;
    el.textContent = text;
    return el;
  }
  function eventRow(e) {  // the same cells as task.html's timeline rows
    var tr = document.createElement("tr");
    if (e.status) { tr.className = "transition"; }
    if (e.kind) { tr.setAttribute("data-kind", e.kind); }
    var when = document.createElement("time");
    when.setAttribute("datetime", e.at);
    when.setAttribute("data-local", "");
    when.textContent = e.at;
    tr.appendChild(cell("When", when));
    tr.appendChild(cell("Source", document.createTextNode(e.source)));
    tr.appendChild(cell("Status", e.status ? span("status status-" + e.status, e.status.replace("_", " "))
                                           : span("muted", "—")));
    var up = span("muted", "—");
    if (e.upstream_status) { up = document.createElement("code"); up.textContent = e.upstream_status; }
    tr.appendChild(cell("Upstream", up));
    tr.appendChild(cell("What happened", document.createTextNode(e.message || "")));
    return tr;
  }
  function followTimeline() {
    var section = document.querySelector("section[data-live-events]");
    if (!section || !window.EventSource) { return; }
    var tbody = section.querySelector("table.events tbody");
    var source = new EventSource(section.getAttribute("data-live-events"));
    var finished = false;
    source.onmessage = function (msg) {
      var e;
      try { e = JSON.parse(msg.data); } catch (err) { return; }
      if (tbody) { tbody.appendChild(eventRow(e)); localise(); }
      if (e.status && TERMINAL.indexOf(e.status) >= 0) {
        finished = true;
        source.close();
        var note = document.createElement("p");
        note.className = "notice notice-info";
        note.setAttribute("role", "status");
        note.appendChild(document.createTextNode("The task is now " + e.status.replace("_", " ") + ". "));
        var again = document.createElement("a");
        again.href = window.location.pathname;
        again.textContent = "Reload for its images and details.";
        note.appendChild(again);
        section.insertBefore(note, section.children[1] || null);
      }
    };
    // The stream ends after the terminal event; EventSource would reconnect forever.
    source.onerror = function () { if (finished) { source.close(); } };
  }
  document.addEventListener("DOMContentLoaded", function () {
    localise(); confirmActions(); followTimeline();
  });
})();
