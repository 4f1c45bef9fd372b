/* isocam viewing: live view and playback with Media Source Extensions, no external library.
 *
 * Live: a WebSocket delivers binary records "kind u8 | meta length u32 | meta JSON | payload"
 * (kind 1: fMP4 init segment + codec string; kind 2: one fMP4 fragment + seq, wall, t0).
 * Fragments are appended in order; each recorder segment restarts its timestamps, and a
 * skipped fragment leaves a hole, so timestampOffset is moved to keep the media timeline
 * continuous. The player stays near the live edge and shows camera-to-screen latency
 * (now - wall clock of the frame on screen, wall as the edge received it).
 *
 * Playback: a WebSocket authorizes the range and sends the listing (segments and gaps) and
 * keeps the playback session open; segments are fetched as whole fMP4 files and appended with
 * timestampOffset = segment start - range start, so media time is wall time from the range
 * start and gaps stay gaps (skipped while playing). The timeline is clickable to seek.
 *
 * CSP forbids inline scripts and style attributes: configuration comes from data-*
 * attributes, styling of the timeline goes through the CSSOM.
 */
(function () {
  "use strict";

  var CLOSE_REVOKED = 4403;
  var CLOSE_UNAVAILABLE = 4503;

  function wsUrl(path) {
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
  }

  function parseRecord(buffer) {
    var view = new DataView(buffer);
    var kind = view.getUint8(0);
    var length = view.getUint32(1);
    var meta = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 5, length)));
    return { kind: kind, meta: meta, payload: new Uint8Array(buffer, 5 + length) };
  }

  function Status(el) {
    this.el = el;
  }
  Status.prototype.set = function (state) {
    if (!this.el) return;
    var key = "msg" + state.charAt(0).toUpperCase() + state.slice(1);
    this.el.textContent = this.el.dataset[key] || state;
    this.el.dataset.state = state;
  };

  function mimeOf(codec) {
    return 'video/mp4; codecs="' + codec + '"';
  }

  function stopVideo(video) {
    video.pause();
    video.removeAttribute("src");
    video.load(); // blank: nothing of a revoked stream stays on screen
  }

  function bufferedEnd(sb) {
    return sb && sb.buffered.length ? sb.buffered.end(sb.buffered.length - 1) : null;
  }

  // Both players: a MediaSource on the <video>, connect() once it is open, tick() at 4 Hz.
  function startPlayer(player) {
    player.ended = false;
    player.ms = new MediaSource();
    player.video.src = URL.createObjectURL(player.ms);
    player.ms.addEventListener("sourceopen", player.connect.bind(player), { once: true });
    setInterval(player.tick.bind(player), 250);
  }

  // The player's WebSocket (data-ws); when it closes, the status says why. `keepUnsupported`:
  // a stream the browser cannot decode keeps saying so after the close.
  function openSocket(player, keepUnsupported) {
    player.status.set("connecting");
    var ws = (player.ws = new WebSocket(wsUrl(player.root.dataset.ws)));
    ws.onclose = function (event) {
      var status = player.status;
      player.ended = true;
      if (event.code === CLOSE_REVOKED) {
        status.set("revoked");
        stopVideo(player.video);
      } else if (event.code === CLOSE_UNAVAILABLE || event.code === 1006) {
        status.set("unavailable");
      } else if (!keepUnsupported || !status.el || status.el.dataset.state !== "unsupported") {
        status.set("ended");
      }
      player.root.dataset.closeCode = String(event.code);
    };
    window.addEventListener("pagehide", function () {
      ws.close(1000);
    });
    return ws;
  }

  // The SourceBuffer for `mime`: created on first use, switched when the codec changes.
  function useMime(player, mime) {
    if (!player.sb) {
      player.sb = player.ms.addSourceBuffer(mime);
      player.sb.mode = "segments";
      player.sb.addEventListener("updateend", player.updated.bind(player));
    } else if (mime !== player.mime && player.sb.changeType) {
      player.sb.changeType(mime);
    }
    player.mime = mime;
  }

  // ------------------------------------------------------------------------------------------
  // Live

  function LivePlayer(root) {
    this.root = root;
    this.video = root.querySelector("video");
    this.status = new Status(root.querySelector(".status"));
    this.latencyEl = root.querySelector(".latency");
    this.queue = [];
    this.sb = null;
    this.mime = null;
    this.lastSeq = null;
    this.lastSegmentSeq = null;
    this.lastEnd = null;
    this.newSegment = false;
    this.marks = [];
    this.fragments = 0;
    this.latency = null;
    startPlayer(this);
    window.isocamViewer = this;
  }

  LivePlayer.prototype.connect = function () {
    var self = this;
    var ws = openSocket(this, true);
    ws.binaryType = "arraybuffer";
    ws.onmessage = function (event) {
      if (typeof event.data === "string") {
        var msg = JSON.parse(event.data);
        if (msg.type === "started") self.status.set("live");
        return;
      }
      self.queue.push(parseRecord(event.data));
      self.pump();
    };
  };

  LivePlayer.prototype.pump = function () {
    if (this.ended && !this.queue.length) return;
    if ((this.sb && this.sb.updating) || !this.queue.length) return;
    var item = this.queue.shift();
    try {
      if (item.kind === 1) {
        var mime = mimeOf(item.meta.codec);
        if (!window.MediaSource || !MediaSource.isTypeSupported(mime)) {
          this.status.set("unsupported");
          this.ws.close(1000);
          return;
        }
        useMime(this, mime);
        this.newSegment = true; // a new recorder segment: its timestamps start again
        this.sb.appendBuffer(item.payload);
      } else if (item.kind === 2 && this.sb) {
        var m = item.meta;
        // Each recorder segment restarts its timestamps at 0, often with a byte-identical
        // init segment (no new init arrives): a new segment_seq, a skipped fragment or a
        // timestamp that does not continue the buffer all mean "re-anchor here".
        var restart =
          this.newSegment ||
          m.seq !== this.lastSeq + 1 ||
          m.segment_seq !== this.lastSegmentSeq ||
          Math.abs(m.t0 + this.sb.timestampOffset - this.lastEnd) > 0.5;
        if (this.lastEnd === null) {
          this.sb.timestampOffset = -m.t0;
        } else if (restart) {
          this.sb.timestampOffset = this.lastEnd - m.t0; // continue where the last one ended
        }
        this.newSegment = false;
        this.lastSeq = m.seq;
        this.lastSegmentSeq = m.segment_seq;
        this.marks.push({ start: m.t0 + this.sb.timestampOffset, wall: m.wall });
        if (this.marks.length > 300) this.marks.splice(0, 100);
        this.fragments += 1;
        this.sb.appendBuffer(item.payload);
      } else {
        this.pump();
      }
    } catch (err) {
      // QuotaExceeded or a decode error: drop what is queued and go on from what comes next
      this.root.dataset.error = String(err && err.name);
      this.queue.length = 0;
    }
  };

  LivePlayer.prototype.updated = function () {
    var end = bufferedEnd(this.sb);
    if (end !== null) {
      this.lastEnd = end;
      var v = this.video;
      if (v.paused && !this.ended) {
        var p = v.play();
        if (p && p.catch) p.catch(function () {});
      }
      // Stay near the live edge: more than 2 s behind, jump to 1.2 s before the newest frame
      // (a little more than one 1 s fragment of buffer, so the next one arrives in time).
      if (end - v.currentTime > 2.0) v.currentTime = end - 1.2;
      // Keep at most ~30 s buffered behind the playhead.
      var start = this.sb.buffered.start(0);
      if (v.currentTime - start > 40 && !this.sb.updating) {
        this.sb.remove(start, v.currentTime - 10);
        return;
      }
    }
    this.pump();
  };

  LivePlayer.prototype.tick = function () {
    var v = this.video;
    var t = v.currentTime;
    var mark = null;
    for (var i = this.marks.length - 1; i >= 0; i--) {
      if (this.marks[i].start <= t + 0.001) {
        mark = this.marks[i];
        break;
      }
    }
    if (mark && !v.paused) {
      this.latency = Date.now() / 1000 - (mark.wall + (t - mark.start));
      v.dataset.latency = this.latency.toFixed(3);
      if (this.latencyEl) this.latencyEl.textContent = this.latency.toFixed(1) + " s";
    }
    v.dataset.fragments = String(this.fragments);
    // A hole in the buffer (should not happen): jump to the next buffered range.
    if (this.sb && !this.sb.updating && v.readyState < 3) {
      var b = this.sb.buffered;
      for (var j = 0; j < b.length; j++) {
        if (b.start(j) > t) {
          v.currentTime = b.start(j) + 0.01;
          break;
        }
      }
    }
  };

  // ------------------------------------------------------------------------------------------
  // Playback

  function fmtTime(ts) {
    // Vietnam time (UTC+7), as the pages show it
    var d = new Date((ts + 7 * 3600) * 1000);
    return d.toISOString().slice(11, 19);
  }

  function place(el, left, width) {
    el.style.position = "absolute";
    el.style.top = "0";
    el.style.bottom = "0";
    el.style.left = left * 100 + "%";
    el.style.width = Math.max(width * 100, 0.15) + "%";
  }

  function PlaybackPlayer(root) {
    this.root = root;
    this.video = root.querySelector("video");
    this.status = new Status(root.querySelector(".status"));
    this.timeline = root.querySelector(".timeline");
    this.clock = root.querySelector(".clock");
    this.segments = [];
    this.gaps = [];
    this.loaded = {};
    this.loading = {};
    this.queue = [];
    this.sb = null;
    this.mime = null;
    this.pendingSeek = null;
    startPlayer(this);
    window.isocamPlayer = this;
  }

  PlaybackPlayer.prototype.connect = function () {
    var self = this;
    var ws = openSocket(this, false);
    ws.onmessage = function (event) {
      var msg = JSON.parse(event.data);
      if (msg.type === "listing") self.listed(msg);
    };
  };

  PlaybackPlayer.prototype.listed = function (msg) {
    this.range = msg.range;
    this.base = msg.base;
    this.segments = msg.segments.slice().sort(function (a, b) {
      return a.start - b.start;
    });
    this.gaps = msg.gaps;
    this.drawTimeline();
    this.root.dataset.segments = String(this.segments.length);
    if (!this.segments.length) {
      this.status.set("none");
      return;
    }
    this.status.set("playing");
    this.seekWall(Math.max(this.range.start, this.segments[0].start));
  };

  PlaybackPlayer.prototype.span = function () {
    return this.range.end - this.range.start;
  };

  PlaybackPlayer.prototype.drawTimeline = function () {
    var tl = this.timeline;
    var self = this;
    tl.textContent = "";
    tl.style.position = "relative";
    tl.style.height = "2.2rem";
    tl.style.background = "#d9dde3";
    tl.style.cursor = "pointer";
    tl.style.userSelect = "none";
    var span = this.span();
    this.segments.forEach(function (s) {
      var el = document.createElement("div");
      el.className = "seg";
      el.dataset.seq = String(s.seq);
      el.title = fmtTime(s.start) + " – " + fmtTime(s.end);
      var lo = Math.max(s.start, self.range.start);
      var hi = Math.min(s.end, self.range.end);
      place(el, (lo - self.range.start) / span, (hi - lo) / span);
      el.style.background = "#0b5cad";
      tl.appendChild(el);
    });
    this.gaps.forEach(function (g) {
      var el = document.createElement("div");
      el.className = "gap";
      el.title = (tl.dataset.gapText || "gap") + " " + fmtTime(g.start) + " – " + fmtTime(g.end);
      place(el, (g.start - self.range.start) / span, (g.end - g.start) / span);
      el.style.background =
        "repeating-linear-gradient(45deg, #b42318 0 4px, #f6f7f9 4px 8px)";
      tl.appendChild(el);
    });
    var cursor = (this.cursor = document.createElement("div"));
    cursor.className = "cursor";
    place(cursor, 0, 0);
    cursor.style.width = "2px";
    cursor.style.background = "#1b1f24";
    tl.appendChild(cursor);
    tl.addEventListener("click", function (event) {
      var rect = tl.getBoundingClientRect();
      var frac = Math.min(Math.max((event.clientX - rect.left) / rect.width, 0), 1);
      self.seekWall(self.range.start + frac * span);
    });
  };

  PlaybackPlayer.prototype.segmentAt = function (wall) {
    // The segment holding `wall`, else the first one after it (a gap), else null.
    for (var i = 0; i < this.segments.length; i++) {
      var s = this.segments[i];
      if (s.end > wall) return s;
    }
    return null;
  };

  PlaybackPlayer.prototype.seekWall = function (wall) {
    var seg = this.segmentAt(wall);
    if (!seg) return;
    var target = Math.max(wall, seg.start);
    this.pendingSeek = target - this.range.start;
    this.root.dataset.seekTarget = String(target);
    this.load(seg);
    this.applySeek();
  };

  PlaybackPlayer.prototype.applySeek = function () {
    if (this.pendingSeek === null || !this.sb) return;
    var t = this.pendingSeek;
    var b = this.sb.buffered;
    for (var i = 0; i < b.length; i++) {
      if (b.start(i) - 0.05 <= t && t < b.end(i)) {
        this.video.currentTime = Math.max(t, b.start(i));
        this.pendingSeek = null;
        var p = this.video.play();
        if (p && p.catch) p.catch(function () {});
        return;
      }
    }
  };

  PlaybackPlayer.prototype.load = function (seg) {
    var self = this;
    if (this.loaded[seg.seq] || this.loading[seg.seq] || this.ended) return;
    this.loading[seg.seq] = true;
    fetch(this.base + seg.seq + ".mp4", { credentials: "same-origin", cache: "no-store" })
      .then(function (resp) {
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        var codec = resp.headers.get("X-Isocam-Codec") || "avc1.64001f";
        return resp.arrayBuffer().then(function (data) {
          self.queue.push({ seg: seg, codec: codec, data: new Uint8Array(data) });
          self.pump();
        });
      })
      .catch(function () {
        delete self.loading[seg.seq];
        self.root.dataset.failed = String(seg.seq);
      });
  };

  PlaybackPlayer.prototype.pump = function () {
    if ((this.sb && this.sb.updating) || !this.queue.length) return;
    var item = this.queue.shift();
    var mime = mimeOf(item.codec);
    if (!MediaSource.isTypeSupported(mime)) {
      this.status.set("unsupported");
      return;
    }
    useMime(this, mime);
    this.sb.timestampOffset = item.seg.start - this.range.start;
    this.appending = item.seg;
    this.sb.appendBuffer(item.data);
  };

  PlaybackPlayer.prototype.updated = function () {
    if (this.appending) {
      this.loaded[this.appending.seq] = true;
      delete this.loading[this.appending.seq];
      this.appending = null;
      this.root.dataset.loaded = String(Object.keys(this.loaded).length);
    }
    this.applySeek();
    // Bound the buffer: drop what is more than 60 s behind the playhead.
    var t = this.video.currentTime;
    var b = this.sb.buffered;
    if (b.length && t - b.start(0) > 90 && !this.sb.updating) {
      var cut = t - 60;
      var self = this;
      this.segments.forEach(function (s) {
        if (s.end - self.range.start < cut) delete self.loaded[s.seq];
      });
      this.sb.remove(0, cut);
      return;
    }
    this.pump();
  };

  PlaybackPlayer.prototype.tick = function () {
    if (!this.range || !this.segments.length) return;
    var v = this.video;
    var wall = this.range.start + v.currentTime;
    if (this.cursor) this.cursor.style.left = ((wall - this.range.start) / this.span()) * 100 + "%";
    if (this.clock) this.clock.textContent = fmtTime(wall);
    v.dataset.wall = wall.toFixed(3);
    if (this.pendingSeek !== null) return;
    var seg = this.segmentAt(wall);
    if (!seg) return;
    // Fetch the next segment ahead of the playhead.
    var idx = this.segments.indexOf(seg);
    var next = this.segments[idx + 1];
    if (next && seg.end - wall < 8) this.load(next);
    if (!this.loaded[seg.seq]) this.load(seg);
    // In a gap (or at the end of what is buffered before one): skip to the next recording.
    if (wall < seg.start - 0.05 && !v.paused) this.seekWall(seg.start);
    else if (v.readyState < 3 && !v.seeking && this.sb && !this.sb.updating) {
      var b = this.sb.buffered;
      for (var j = 0; j < b.length; j++) {
        if (b.start(j) > v.currentTime + 0.02 && b.start(j) - v.currentTime < 1.5) {
          v.currentTime = b.start(j) + 0.01;
          break;
        }
      }
    }
  };

  // ------------------------------------------------------------------------------------------
  // Snapshots on the site page: refresh every few seconds (the hub rate-limits them)

  function Snapshots(imgs) {
    imgs.forEach(function (img) {
      var src = img.dataset.src;
      function refresh() {
        img.src = src + "?t=" + Date.now();
      }
      refresh();
      setInterval(refresh, 10000);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var live = document.querySelector(".live-player");
    if (live) new LivePlayer(live);
    var playback = document.querySelector(".playback-player");
    if (playback) new PlaybackPlayer(playback);
    var snaps = document.querySelectorAll("img.snapshot[data-src]");
    if (snaps.length) Snapshots(Array.prototype.slice.call(snaps));
  });
})();
