// tether web UI: the agent page's syncs section follows kas's server-sent events, so a sync
// shows up and progresses without reloading. Everything else works without this script.
"use strict";
(function () {
  var section = document.getElementById("syncs");
  if (!section || !window.EventSource) { return; }
  var source = new EventSource(section.getAttribute("data-live"));
  source.addEventListener("syncs", function (e) {
    // The fragment is rendered by kas, every value in it escaped there.
    section.innerHTML = e.data;
    section.setAttribute("data-updated", String(Date.now()));
  });
  source.onerror = function () { section.setAttribute("data-live-state", "reconnecting"); };
  source.onopen = function () { section.setAttribute("data-live-state", "open"); };
})();
