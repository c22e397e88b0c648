// The console's only script: local times, the viewer's zone for date filters, and a
// confirmation before an action. Every page works without it (times stay in UTC, an
// action asks on a page of its own).
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
    document.querySelectorAll("time[data-local]").forEach(function (el) {
      var d = new Date(el.getAttribute("datetime"));
      if (isNaN(d.getTime())) { return; }
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
  document.addEventListener("DOMContentLoaded", function () { localise(); confirmActions(); });
})();
