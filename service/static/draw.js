"use strict";
const pad = document.getElementById("pad");
const ink = pad.getContext("2d");
const result = document.getElementById("result");
let drawing = false;
let answered = null;  // the last answer, for the user's verdict on it

function clearPad() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
  ink.lineWidth = 18;
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.strokeStyle = "#000";
  result.textContent = "";
  document.getElementById("probabilities").replaceChildren();
  document.getElementById("feedback").hidden = true;
  answered = null;
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

pad.addEventListener("pointerdown", (event) => {
  drawing = true;
  try { pad.setPointerCapture(event.pointerId); } catch (_) { /* synthetic pointers have no capture */ }
  ink.beginPath();
  ink.moveTo(...point(event));
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  ink.lineTo(...point(event));
  ink.stroke();
});
["pointerup", "pointercancel", "pointerleave"].forEach((name) => pad.addEventListener(name, () => { drawing = false; }));

async function predict() {
  const png = await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
  result.className = "";
  result.textContent = "…";
  try {
    const answer = await fetch("predict_image", { method: "POST", headers: { "Content-Type": "image/png" }, body: png });
    const body = await answer.json();
    if (!answer.ok) throw new Error(body.error || `HTTP ${answer.status}`);
    show(body);
  } catch (error) {
    result.className = "error";
    result.textContent = `Could not predict: ${error.message}`;
  }
}

function show(body) {
  answered = body;
  document.getElementById("feedback").hidden = false;
  document.getElementById("thanks").textContent = "";
  result.textContent = `Digit ${body.digit} (model version ${body.model_version})`;
  const bars = body.probabilities.map((p, digit) => {
    const row = document.createElement("div");
    row.className = "bar";
    const label = document.createElement("span");
    label.textContent = digit;
    const bar = document.createElement("div");
    bar.style.width = `${(p * 200).toFixed(1)}px`;  // CSSOM, allowed by the page's Content-Security-Policy
    const percent = document.createElement("span");
    percent.textContent = `${(p * 100).toFixed(1)} %`;
    row.append(label, bar, percent);
    return row;
  });
  document.getElementById("probabilities").replaceChildren(...bars);
  const seen = document.getElementById("seen").getContext("2d");
  const image = seen.createImageData(28, 28);
  body.pixels.flat().forEach((v, i) => { image.data.set([255 - v, 255 - v, 255 - v, 255], i * 4); });
  seen.putImageData(image, 0, 0);
}

function drawExample() {
  // a "7", drawn through the same pointer handlers a person uses
  clearPad();
  const box = pad.getBoundingClientRect();
  const stroke = [[70, 60], [210, 60], [180, 120], [150, 180], [125, 240]];
  const fire = (type, [x, y]) => pad.dispatchEvent(new PointerEvent(type, {
    clientX: box.left + x * box.width / pad.width, clientY: box.top + y * box.height / pad.height, pointerId: 1, bubbles: true }));
  fire("pointerdown", stroke[0]);
  stroke.slice(1).forEach((p) => fire("pointermove", p));
  fire("pointerup", stroke[stroke.length - 1]);
  return predict();
}

async function sendFeedback(label) {
  if (answered === null) return;
  const thanks = document.getElementById("thanks");
  const body = { pixels: answered.pixels, predicted: answered.digit, label, model_version: answered.model_version };
  try {
    const answer = await fetch("feedback", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const reply = await answer.json();
    if (!answer.ok) throw new Error(reply.error || `HTTP ${answer.status}`);
    thanks.textContent = `Thanks: noted as a ${label}.`;
    answered = null;  // one verdict per answer
  } catch (error) {
    thanks.textContent = `Not sent: ${error.message}`;
  }
}

const digitButtons = [...Array(10).keys()].map((digit) => {
  const button = document.createElement("button");
  button.textContent = digit;
  button.className = "digit";
  button.addEventListener("click", () => sendFeedback(digit));
  return button;
});
document.getElementById("digits").replaceChildren(...digitButtons);
document.getElementById("right").addEventListener("click", () => answered && sendFeedback(answered.digit));
document.addEventListener("keydown", (event) => {
  if (/^[0-9]$/.test(event.key) && answered !== null) sendFeedback(Number(event.key));
});

document.getElementById("predict").addEventListener("click", predict);
document.getElementById("clear").addEventListener("click", clearPad);
document.getElementById("example").addEventListener("click", drawExample);
clearPad();
// demo links: /draw#example draws and predicts a 7; /draw#example&label=7 also sends that verdict
const demo = new URLSearchParams(location.hash.slice(1));
if (demo.has("example")) drawExample().then(() => demo.has("label") && sendFeedback(Number(demo.get("label"))));
