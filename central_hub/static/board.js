/* isocam NOC board: live alerts, region refresh, the outage timeline chart, the uptime form.
 *
 * No framework and no CDN (the CSP allows scripts from this origin only, and no inline code).
 * - Alerts arrive on the WebSocket /api/alerts, already filtered to the user's scope by the
 *   server. Each one is listed in the alerts panel and makes the page re-read itself: the
 *   regions marked data-live whose HTML changed are swapped in place (the server renders them,
 *   so the browser never holds more than what one page shows). A region holding the focused
 *   form field is left alone so typing is never lost. A slow refresh every 30 s covers alerts
 *   lost while disconnected. The re-read says so (X-Board-Refresh: 1): the server may then
 *   leave out a slow-moving region (the site's uptime), which the page simply keeps.
 * - The outage timeline (.timeline[data-src]) is drawn as SVG from the JSON API.
 * Texts come from data-t-* attributes rendered by the server in the page's language.
 */
(function () {
  "use strict";

  var app = document.getElementById("board-app");
  if (!app) { return; }
  var lang = app.getAttribute("data-lang") === "en" ? "en" : "vi";
  var SVG = "http://www.w3.org/2000/svg";
  var MIN_REFRESH_MS = 2000;
  var SLOW_REFRESH_MS = 30000;
  var MAX_ALERTS = 50;

  function text(name) { return app.getAttribute("data-t-" + name) || ""; }

  var timeFmt = new Intl.DateTimeFormat(lang === "en" ? "en-GB" : "vi-VN", {
    timeZone: "Asia/Ho_Chi_Minh", hour: "2-digit", minute: "2-digit", second: "2-digit",
    hour12: false
  });
  var dayFmt = new Intl.DateTimeFormat(lang === "en" ? "en-GB" : "vi-VN", {
    timeZone: "Asia/Ho_Chi_Minh", day: "2-digit", month: "2-digit", hour: "2-digit",
    minute: "2-digit", hour12: false
  });
  function clock(ts) { return timeFmt.format(new Date(ts * 1000)); }
  function stamp(ts) { return dayFmt.format(new Date(ts * 1000)); }

  // --- region refresh ------------------------------------------------------------------------

  var refreshing = false;
  var pending = false;
  var lastRefresh = 0;
  var timer = null;
  var refreshes = 0;
  var stopped = false;

  function focusedInside(el) {
    var f = document.activeElement;
    if (!f || f === document.body) { return false; }
    var tag = f.tagName;
    return (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") && el.contains(f);
  }

  function swap(doc) {
    var regions = document.querySelectorAll("[data-live][id]");
    for (var i = 0; i < regions.length; i++) {
      var old = regions[i];
      var fresh = doc.getElementById(old.id);
      if (!fresh || fresh.innerHTML === old.innerHTML || focusedInside(old)) { continue; }
      var node = document.importNode(fresh, true);
      keepCharts(old, node);
      old.parentNode.replaceChild(node, old);
      drawCharts(node);
    }
  }

  // A swapped region shows its previous chart until the new one is drawn: no blank flash.
  function keepCharts(old, node) {
    var boxes = node.querySelectorAll(".timeline[id]");
    for (var i = 0; i < boxes.length; i++) {
      var before = old.querySelector("#" + boxes[i].id);
      if (!before || !before.hasAttribute("data-drawn")) { continue; }
      while (before.firstChild) { boxes[i].appendChild(before.firstChild); }
      boxes[i].setAttribute("data-drawn", before.getAttribute("data-drawn"));
    }
  }

  function refresh() {
    if (stopped) { return; }
    if (refreshing) { pending = true; return; }
    refreshing = true;
    lastRefresh = Date.now();
    fetch(window.location.href, {
      credentials: "same-origin", headers: { "Accept": "text/html", "X-Board-Refresh": "1" },
      cache: "no-store"
    }).then(function (resp) {
      if (resp.redirected && resp.url.indexOf("/login") >= 0) { sessionEnded(); return null; }
      if (!resp.ok) { return null; }
      return resp.text();
    }).then(function (html) {
      if (html) {
        swap(new DOMParser().parseFromString(html, "text/html"));
        refreshes += 1;
        app.setAttribute("data-refreshes", String(refreshes));
      }
    }).catch(function () { /* the next alert or the slow timer tries again */ })
      .then(function () {
        refreshing = false;
        if (pending) { pending = false; schedule(); }
      });
  }

  function schedule() {
    if (timer !== null) { return; }
    var wait = Math.max(0, lastRefresh + MIN_REFRESH_MS - Date.now());
    timer = window.setTimeout(function () { timer = null; refresh(); }, wait);
  }

  // --- alerts --------------------------------------------------------------------------------

  var list = document.getElementById("alerts");
  var status = document.getElementById("alerts-status");
  var socket = null;
  var backoff = 1000;

  function setStatus(connected, label) {
    if (!status) { return; }
    status.textContent = label || text(connected ? "connected" : "disconnected");
    status.className = "ws-state " + (connected ? "ws-on" : "ws-off");
  }

  function sessionEnded() {
    stopped = true;
    setStatus(false, text("ended"));
    if (socket) { socket.close(); }
  }

  function showAlert(alert) {
    if (!list) { return; }
    var li = document.createElement("li");
    li.className = "sev-" + (alert.severity || "info");
    li.setAttribute("data-type", alert.type || "");
    if (alert.site_id) { li.setAttribute("data-site-id", alert.site_id); }
    if (alert.camera_id) { li.setAttribute("data-camera-id", alert.camera_id); }
    var when = document.createElement("time");
    when.textContent = clock(alert.at || Date.now() / 1000);
    li.appendChild(when);
    li.appendChild(document.createTextNode(" "));
    var body = lang === "en" ? alert.text_en : alert.text_vi;
    if (alert.site_id) {
      var a = document.createElement("a");
      a.href = "/board/sites/" + encodeURIComponent(alert.site_id);
      a.textContent = alert.site_name || alert.site_id;
      li.appendChild(a);
      li.appendChild(document.createTextNode(": "));
    }
    li.appendChild(document.createTextNode(body || alert.type || ""));
    list.insertBefore(li, list.firstChild);
    while (list.children.length > MAX_ALERTS) { list.removeChild(list.lastChild); }
  }

  function connect() {
    if (stopped || !window.WebSocket) { return; }
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var url = scheme + window.location.host + app.getAttribute("data-alerts-url");
    socket = new WebSocket(url);
    socket.onmessage = function (ev) {
      var alert;
      try { alert = JSON.parse(ev.data); } catch (e) { return; }
      if (alert.type === "hello") {
        // Anything that happened between rendering the page and this moment was pushed to
        // nobody: read the page once more.
        backoff = 1000;
        setStatus(true);
        schedule();
        return;
      }
      if (alert.type !== "alerts_dropped") { showAlert(alert); }
      schedule();
    };
    socket.onclose = function (ev) {
      setStatus(false);
      if (ev.code === 4401 || ev.code === 1008) { sessionEnded(); return; }
      window.setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 30000);
    };
  }

  // --- the outage timeline -------------------------------------------------------------------

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVG, name);
    for (var k in attrs) {
      if (Object.prototype.hasOwnProperty.call(attrs, k)) { node.setAttribute(k, String(attrs[k])); }
    }
    if (parent) { parent.appendChild(node); }
    return node;
  }

  function duration(s) {
    s = Math.max(0, Math.round(s));
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h) { return h + (lang === "en" ? " h " : " giờ ") + m + (lang === "en" ? " min" : " phút"); }
    if (m) { return m + (lang === "en" ? " min " : " phút ") + sec + (lang === "en" ? " s" : " giây"); }
    return sec + (lang === "en" ? " s" : " giây");
  }

  function rowsOf(items) {
    var names = [""];  // the site's own row first
    var cams = document.querySelectorAll("article.camera[data-camera-id]");
    for (var i = 0; i < cams.length; i++) {
      var id = cams[i].getAttribute("data-camera-id");
      if (names.indexOf(id) < 0) { names.push(id); }
    }
    for (var j = 0; j < items.length; j++) {
      var c = items[j].camera_id || "";
      if (names.indexOf(c) < 0) { names.push(c); }
    }
    return names;
  }

  function draw(box, data) {
    var since = data.since, until = data.until, now = data.now || until;
    var items = data.items || [];
    var names = rowsOf(items);
    var width = Math.max(320, box.clientWidth || 800);
    var left = 130, right = 12, top = 22, rowH = 20;
    var height = top + names.length * rowH + 8;
    var span = until - since;
    function x(t) { return left + (Math.min(Math.max(t, since), until) - since) / span * (width - left - right); }

    while (box.firstChild) { box.removeChild(box.firstChild); }
    var svg = el("svg", { "class": "timeline-chart", width: width, height: height,
      viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": text("chart") }, box);
    // time axis
    var ticks = 6;
    for (var k = 0; k <= ticks; k++) {
      var t = since + span * k / ticks;
      var tx = x(t);
      el("line", { "class": "grid", x1: tx, x2: tx, y1: top - 4, y2: height - 6 }, svg);
      var label = el("text", { "class": "tick", x: tx, y: 12,
        "text-anchor": k === 0 ? "start" : k === ticks ? "end" : "middle" }, svg);
      label.textContent = span > 2 * 86400 ? stamp(t) : clock(t).slice(0, 5);
    }
    // rows
    for (var r = 0; r < names.length; r++) {
      var y = top + r * rowH;
      el("rect", { "class": "row" + (r % 2 ? " odd" : ""), x: left, y: y, width: width - left - right,
        height: rowH - 2 }, svg);
      var name = el("text", { "class": "row-label", x: left - 6, y: y + rowH / 2 + 3,
        "text-anchor": "end" }, svg);
      name.textContent = names[r] || text("site-level");
    }
    // outages
    for (var i = 0; i < items.length; i++) {
      var o = items[i];
      var row = names.indexOf(o.camera_id || "");
      var end = o.ended_at === null ? now : o.ended_at;
      var x0 = x(o.started_at), x1 = Math.max(x(end), x0 + 2);
      var g = el("g", { "class": "outage kind-" + o.kind + (o.ended_at === null ? " open" : ""),
        "data-outage-id": o.id }, svg);
      el("rect", { x: x0, y: top + row * rowH + 2, width: x1 - x0, height: rowH - 6, rx: 2 }, g);
      el("title", {}, g).textContent = (o.camera_id || text("site-level")) + " — " + o.kind +
        " (" + o.cause + "): " + stamp(o.started_at) + " → " +
        (o.ended_at === null ? text("open") : stamp(o.ended_at)) + ", " + duration(end - o.started_at);
    }
    el("line", { "class": "now", x1: x(now), x2: x(now), y1: top - 4, y2: height - 6 }, svg);
    box.setAttribute("data-drawn", String(items.length));
  }

  function drawCharts(root) {
    var boxes = root.querySelectorAll ? root.querySelectorAll(".timeline[data-src]") : [];
    if (root.classList && root.classList.contains("timeline")) { boxes = [root]; }
    for (var i = 0; i < boxes.length; i++) { load(boxes[i]); }
  }

  function load(box) {
    fetch(box.getAttribute("data-src"), {
      credentials: "same-origin", headers: { "Accept": "application/json" }, cache: "no-store"
    }).then(function (resp) {
      if (!resp.ok) { throw new Error("HTTP " + resp.status); }
      return resp.json();
    }).then(function (data) { draw(box, data); })
      .catch(function () {
        box.textContent = text("chart-error");
        box.setAttribute("data-drawn", "error");
      });
  }

  drawCharts(document);
  connect();
  window.setInterval(function () { if (!document.hidden) { schedule(); } }, SLOW_REFRESH_MS);
})();

/* The uptime page's period form: typing a date means "custom dates" (without this script the
 * user picks "custom" in the list; the server ignores the dates for the named periods). */
(function () {
  "use strict";

  var form = document.getElementById("uptime-filters");
  if (!form) { return; }
  var period = form.querySelector("select[name=period]");
  var dates = form.querySelectorAll("input[type=date]");
  for (var i = 0; i < dates.length; i++) {
    dates[i].addEventListener("change", function () { if (period) { period.value = "custom"; } });
  }
})();
