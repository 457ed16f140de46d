// The demo: builds a seeded layer, runs it on WebGPU and on the CPU reference, and shows
// the routing histogram, dropped tokens, losses and timing. `?auto=1` runs once on load
// (with optional experts=, tokens=, topk=, dmodel=, dff= parameters) and puts the verdict
// in the page title, which the browser test reads.
import init, { WebMoeLayer, randomTokens, configJson } from "./pkg/switch_moe.js";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
for (const [param, id] of [["experts", "experts"], ["tokens", "tokens"], ["topk", "top-k"]]) {
  if (params.has(param)) $(id).value = params.get(param);
}
const dModel = Number(params.get("dmodel") ?? 64);
const dFF = Number(params.get("dff") ?? 128);

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").className = kind ?? "";
}

function drawHistogram(counts, kept) {
  const canvas = $("histogram");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const n = counts.length;
  const max = Math.max(1, ...counts);
  const width = (canvas.width - 40) / n;
  const top = 28;
  const height = canvas.height - top - 20;
  ctx.font = "11px sans-serif";
  for (let e = 0; e < n; e++) {
    const x = 30 + e * width;
    const routed = (counts[e] / max) * height;
    const keptHeight = (kept[e] / max) * height;
    ctx.fillStyle = "#f4a7a7"; // dropped part
    ctx.fillRect(x, top + height - routed, Math.max(1, width - 2), routed);
    ctx.fillStyle = "#4f81bd"; // kept part
    ctx.fillRect(x, top + height - keptHeight, Math.max(1, width - 2), keptHeight);
    ctx.fillStyle = "#222";
    if (n <= 32) ctx.fillText(String(e), x, canvas.height - 5);
  }
  ctx.fillStyle = "#222";
  ctx.fillText(`${max} assignments`, 0, top - 4);
  ctx.fillText("kept (blue) and dropped (red) per expert", 120, top - 4);
}

async function run() {
  const experts = Number($("experts").value);
  const tokens = Number($("tokens").value);
  const topK = Number($("top-k").value);
  const capacity = Number($("capacity").value);
  setStatus("building the layer…");
  const layer = await WebMoeLayer.random(experts, dModel, dFF, configJson(topK, capacity), 7);
  const x = randomTokens(tokens, dModel, 11);
  const first = await layer.forward(x, tokens); // warm-up: allocates and compiles
  const start = performance.now();
  const gpu = await layer.forward(x, tokens);
  const gpuMs = performance.now() - start;
  const cpuStart = performance.now();
  const cpu = layer.forwardCpu(x, tokens);
  const cpuMs = performance.now() - cpuStart;
  const maxDiff = gpu.compareWith(cpu);
  const scale = Math.max(...cpu.y.map(Math.abs), 1e-30);
  const ok = maxDiff >= 0 && maxDiff <= 1e-4 * scale && first.compareWith(gpu) === 0;
  const counts = Array.from(gpu.counts);
  const kept = Array.from(gpu.kept);
  drawHistogram(counts, kept);
  $("stats").innerHTML = [
    ["adapter", layer.adapter],
    ["layer", `${experts} experts, d_model ${dModel}, d_ff ${dFF}, ${tokens} tokens, top-${topK}`],
    ["dropped assignments", `${gpu.nDropped} of ${tokens * topK}`],
    ["aux loss", gpu.auxLoss.toFixed(6)],
    ["z loss", gpu.zLoss.toFixed(6)],
    ["GPU forward", `${gpuMs.toFixed(1)} ms`],
    ["CPU reference", `${cpuMs.toFixed(1)} ms`],
    ["max |GPU − CPU|", maxDiff < 0 ? "routes or counts differ" : maxDiff.toExponential(2)],
  ].map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join("");
  const verdict = ok ? "MATCH" : "MISMATCH";
  setStatus(`${verdict}: the GPU forward ${ok ? "equals" : "differs from"} the CPU reference`, ok ? "ok" : "bad");
  document.title = `switch-moe: ${verdict} ${maxDiff.toExponential(2)} dropped=${gpu.nDropped}`;
  console.log(document.title);
}

async function main() {
  try {
    await init();
    if (!navigator.gpu) throw new Error("this browser has no WebGPU (navigator.gpu is undefined)");
    $("run").onclick = () => run().catch(fail);
    if (params.get("auto") === "1") await run();
    else setStatus("ready");
  } catch (error) {
    fail(error);
  }
}

function fail(error) {
  setStatus(`error: ${error.message ?? error}`, "bad");
  document.title = `switch-moe: ERROR ${error.message ?? error}`;
  console.log(document.title);
}

main();
