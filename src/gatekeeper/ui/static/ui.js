// The status page's only script: local times, countdowns, and live updates (the page
// reads fine without it). Twice a second it asks /ui/live what changed in the page since
// the live part it shows (data-tag) and swaps in the parts that changed (a gate, a table),
// or the whole live part, unless a form in it is being filled in.
(function () {
  "use strict";
  function localTimes(root) {
    root.querySelectorAll("time[datetime]:not(.countdown)").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) { el.textContent = when.toLocaleString(); }
    });
  }
  function span(s) {
    var units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]], out = [];
    units.forEach(function (u) {
      if (out.length || s >= u[1] || u[0] === "s") {
        out.push(Math.floor(s / u[1]) + u[0]); s %= u[1];
      }
    });
    return out.join(" ");
  }
  function countdowns() {
    document.querySelectorAll("time.countdown").forEach(function (el) {
      var left = Math.round((new Date(el.getAttribute("datetime")) - new Date()) / 1000);
      el.textContent = left > 0 ? span(left) : "now";
    });
  }
  function busy(live) {
    var active = document.activeElement;
    if (active && live.contains(active) && active.matches("input, select, textarea")) { return true; }
    return Array.prototype.some.call(live.querySelectorAll("input[type=text]"), function (i) { return i.value; });
  }
  function fragment(html) {
    var t = document.createElement("template");
    t.innerHTML = html;
    return t.content;
  }
  function apply(body) {
    if (body.live !== undefined) {
      live.replaceChildren(fragment(body.live));
    } else {
      var parts = live.querySelectorAll("[data-part]");
      for (var i = 0; i < body.parts.length; i++) {
        if (!parts[body.parts[i][0]]) { return false; }
      }
      body.parts.forEach(function (p) { parts[p[0]].replaceWith(fragment(p[1])); });
    }
    live.dataset.tag = body.tag;
    localTimes(live); countdowns();
    return true;
  }
  var live = document.getElementById("live"), fetching = false;
  localTimes(document); countdowns();
  setInterval(countdowns, 1000);
  if (!live || !live.dataset.live || !window.fetch) { return; }
  function poll() {
    if (fetching || busy(live)) { return; }
    fetching = true;
    var url = "/ui/live?page=" + encodeURIComponent(location.pathname + location.search) +
      "&tag=" + encodeURIComponent(live.dataset.tag);
    fetch(url, {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (r.status === 401) { location.reload(); throw new Error("signed out"); }
      if (!r.ok) { throw new Error("live: " + r.status); }
      return r.json();
    }).then(function (body) {
      if (body.reload) { location.reload(); return; }
      if (body.tag === live.dataset.tag || busy(live)) { return; }
      if (!apply(body)) { live.dataset.tag = ""; }  // out of step: the whole part next time
    }).catch(function () {}).then(function () { fetching = false; });
  }
  setInterval(poll, 500);
})();
