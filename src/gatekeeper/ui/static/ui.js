// The status page's only script: local times, countdowns, and live updates (the page
// reads fine without it). Polls /ui/live twice a second; when its stamp changes, fetches
// the page again and swaps in its #live part, unless a form in it is being filled in.
// The part says which stamp it shows (data-stamp): a page served a moment late (the server
// keeps rendered pages half a second) is fetched again, at most once a second.
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
  var live = document.getElementById("live"), fetching = false, fetchedAt = 0;
  localTimes(document); countdowns();
  setInterval(countdowns, 1000);
  if (!live || !live.dataset.live || !window.fetch) { return; }
  function poll() {
    if (fetching) { return; }
    fetching = true;
    fetch("/ui/live", {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (r.status === 401) { location.reload(); throw new Error("signed out"); }
      return r.json();
    }).then(function (body) {
      if (String(body.stamp) === live.dataset.stamp || busy(live)) { return; }
      if (Date.now() - fetchedAt < 1000) { return; }  // the page at most once a second
      fetchedAt = Date.now();
      return fetch(location.href, {credentials: "same-origin", cache: "no-store"}).then(function (r) {
        return r.text();
      }).then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        if (fresh && !busy(live)) {
          live.replaceChildren.apply(live, Array.prototype.slice.call(fresh.childNodes));
          live.dataset.stamp = fresh.dataset.stamp;
          localTimes(live); countdowns();
        }
      });
    }).catch(function () {}).then(function () { fetching = false; });
  }
  poll();
  setInterval(poll, 500);
})();
