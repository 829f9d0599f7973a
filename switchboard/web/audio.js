// Listening: the call's live audio played through Web Audio, with a level meter and mute.

// The call's live audio arrives on its socket as binary frames: 20 ms of 16 kHz mono signed
// 16-bit little-endian PCM each (SPEC 5.3). Each frame becomes an AudioBuffer scheduled on the
// AudioContext's clock about 100 ms ahead of now (a jitter buffer: frames that arrive unevenly
// still play back to back); when the queue runs dry it fills up again from 100 ms ahead, and a
// frame that would play more than half a second late is dropped, so the listener stays near
// the present. No worklet, no blob: the page's `default-src 'self'` allows all of this.
const AUDIO_RATE = 16000, AHEAD = 0.1, MOST_AHEAD = 0.5;

export function audioPlayer(meter) {
  let context = null, analyser = null, gain = null, samples = null, playAt = 0, timer = null;
  let scheduled = 0, dropped = 0, muted = false;
  const show = () => { meter.dataset.chunks = String(scheduled); meter.dataset.dropped = String(dropped); };
  // The level is measured before the mute, so a muted listener still sees the call talking.
  const measure = () => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const x of samples) sum += x * x;
    const rms = Math.sqrt(sum / samples.length);
    meter.value = Math.min(1, rms * 4);
    meter.dataset.rms = rms.toFixed(4);
  };
  return {
    start() {
      try { context = new AudioContext({ sampleRate: AUDIO_RATE, latencyHint: "interactive" }); }
      catch { context = new AudioContext({ latencyHint: "interactive" }); }  // buffers say 16 kHz anyway
      analyser = context.createAnalyser();
      analyser.fftSize = 2048;
      samples = new Float32Array(analyser.fftSize);
      gain = context.createGain();
      gain.gain.value = muted ? 0 : 1;
      analyser.connect(gain).connect(context.destination);
      playAt = 0; scheduled = 0; dropped = 0; show();
      timer = setInterval(measure, 100);
      context.resume();  // started from a click or a key: the browser lets it play
    },
    play(data) {
      if (!context) return;
      const view = new DataView(data), count = data.byteLength >> 1;
      if (!count) return;
      const buffer = context.createBuffer(1, count, AUDIO_RATE), channel = buffer.getChannelData(0);
      for (let i = 0; i < count; i++) channel[i] = view.getInt16(2 * i, true) / 32768;
      const now = context.currentTime;
      if (playAt < now) playAt = now + AHEAD;  // the first frame, or the queue ran dry
      else if (playAt > now + MOST_AHEAD) { dropped++; show(); return; }
      const source = context.createBufferSource();
      source.buffer = buffer;
      source.connect(analyser);
      source.start(playAt);
      playAt += buffer.duration;
      scheduled++; show();
    },
    mute(on) {
      muted = on;
      if (gain) gain.gain.value = on ? 0 : 1;
    },
    stop() {
      clearInterval(timer); timer = null;
      context?.close().catch(() => {});
      context = analyser = gain = null;
      meter.value = 0; meter.dataset.rms = "0";
    },
  };
}

