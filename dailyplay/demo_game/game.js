// Star Catcher: the demo's game page. Everything DailyPlay-specific is in the gate below.
"use strict";

const statusLine = document.getElementById("status");
const playButton = document.getElementById("play");
const stage = document.getElementById("stage");
const canvas = document.getElementById("game");
const points = document.getElementById("points");
const left = document.getElementById("left");

const gate = DailyPlay.gate({
  playerUuid: "demo-player",
  onChange(state) {
    statusLine.textContent = state.message;
    statusLine.dataset.state = state.name;
    playButton.disabled = state.name !== "ready";
    playButton.hidden = state.final || state.name === "playing";
  },
});
document.getElementById("api").textContent = DailyPlay.client().apiUrl;

playButton.addEventListener("click", async () => {
  const session = await gate.play();
  if (session) startGame(session);
});

function startGame(session) {
  document.body.dataset.game = "running";
  stage.hidden = false;
  const context = canvas.getContext("2d");
  const star = { x: 240, y: 150, dx: 2.2, dy: 1.7, r: 18 };
  let score = 0;
  let remaining = 20;
  const clock = setInterval(() => {
    remaining -= 1;
    left.textContent = String(remaining);
    if (remaining <= 0) {
      clearInterval(clock);
      document.body.dataset.game = "over";
      statusLine.textContent = `Game over: ${score} stars caught. Thanks for playing!`;
    }
  }, 1000);
  canvas.addEventListener("click", (event) => {
    if (remaining <= 0) return;
    const box = canvas.getBoundingClientRect();
    const x = ((event.clientX - box.left) * canvas.width) / box.width;
    const y = ((event.clientY - box.top) * canvas.height) / box.height;
    if (Math.hypot(x - star.x, y - star.y) <= star.r * 1.5) {
      score += 1;
      points.textContent = String(score);
      star.dx *= 1.1;
      star.dy *= 1.1;
    }
  });
  function frame() {
    star.x += star.dx;
    star.y += star.dy;
    if (star.x < star.r || star.x > canvas.width - star.r) star.dx = -star.dx;
    if (star.y < star.r || star.y > canvas.height - star.r) star.dy = -star.dy;
    context.clearRect(0, 0, canvas.width, canvas.height);
    context.fillStyle = "#f5c542";
    context.beginPath();
    for (let i = 0; i < 10; i += 1) {
      const radius = i % 2 === 0 ? star.r : star.r / 2.3;
      const angle = (Math.PI / 5) * i - Math.PI / 2;
      context.lineTo(star.x + radius * Math.cos(angle), star.y + radius * Math.sin(angle));
    }
    context.closePath();
    context.fill();
    if (remaining > 0) requestAnimationFrame(frame);
  }
  requestAnimationFrame(frame);
}
