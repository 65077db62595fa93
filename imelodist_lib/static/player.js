// IMelodist player: play/stop buttons and a playback cursor over verovio's engraved SVG.
// Inlined into every player's HTML (no network, works in saved notebooks and HTML exports).
// The cursor table is [[ms, [note ids sounding]], ...], precomputed in Python from verovio's timemap.
(function (root) {
  if (!root || root.getAttribute("data-ready") === "1") return;
  root.setAttribute("data-ready", "1");
  var audio = root.querySelector("audio");
  var table = JSON.parse((root.querySelector("script.imp-timemap") || {}).textContent || "[]");
  var score = root.querySelector(".imp-score");
  var lit = [], frame = 0;

  function indexAt(ms) {  // last entry whose time is <= ms (binary search)
    var lo = 0, hi = table.length - 1, ans = -1;
    while (lo <= hi) {
      var mid = (lo + hi) >> 1;
      if (table[mid][0] <= ms) { ans = mid; lo = mid + 1; } else { hi = mid - 1; }
    }
    return ans;
  }
  function clear() {
    for (var i = 0; i < lit.length; i++) lit[i].classList.remove("imp-on");
    lit = [];
  }
  function paint(ms) {
    clear();
    var i = indexAt(ms);
    if (i < 0 || !score) return 0;
    var ids = table[i][1];
    for (var k = 0; k < ids.length; k++) {
      var el = score.querySelector('g[data-id="' + ids[k] + '"]');
      if (el) { el.classList.add("imp-on"); lit.push(el); }
    }
    return lit.length;
  }
  function loop() {
    paint(audio.currentTime * 1000);
    if (!audio.paused) frame = requestAnimationFrame(loop);
  }
  // Exposed for tests and for a reader poking at the page: highlight the notes sounding at `ms`.
  root.impSeek = paint;
  if (!audio) return;
  audio.addEventListener("play", function () { cancelAnimationFrame(frame); frame = requestAnimationFrame(loop); });
  audio.addEventListener("seeked", function () { paint(audio.currentTime * 1000); });
  audio.addEventListener("ended", clear);
  var play = root.querySelector('button[data-act="play"]');
  var stop = root.querySelector('button[data-act="stop"]');
  if (play) play.addEventListener("click", function () { audio.play(); });
  if (stop) stop.addEventListener("click", function () { audio.pause(); audio.currentTime = 0; clear(); });
  // The .wav link reuses the audio element's data: URI instead of embedding the sound twice.
  var wav = root.querySelector("a.imp-wav");
  if (wav) { wav.href = audio.currentSrc || audio.src; wav.style.display = ""; }
})((document.currentScript && document.currentScript.closest &&
    document.currentScript.closest(".imelodist-player")) ||
   document.getElementById("__IMP_ROOT_ID__"));
