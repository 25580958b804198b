// The montage chat room's client: one WebSocket to the room, plain DOM, no library.
(function () {
  "use strict";
  const list = document.getElementById("messages");
  const status = document.getElementById("status");
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  const send = document.getElementById("chat-send");
  const worker = document.getElementById("worker");
  const url = new URL(list.dataset.socket, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  // Codes after which trying again makes sense: going away (1001), connection lost (1006),
  // server restarting (1012, sent by the worker on a graceful stop), try again later (1013).
  const RETRY = new Set([1001, 1006, 1012, 1013]);
  let socket = null;
  let attempts = 0;

  function show(event) {
    if (event.type === "welcome") {
      worker.textContent = String(event.worker);
      return;
    }
    const item = document.createElement("li");
    item.className = event.type;
    item.dataset.user = event.user;
    const time = new Date(event.time).toLocaleTimeString();
    if (event.type === "message") {
      const who = document.createElement("strong");
      who.textContent = event.user;
      item.append(time + " ", who, ": " + event.text);
    } else {
      item.textContent = time + " " + event.user + (event.type === "join" ? " joined" : " left") +
        " (worker " + event.worker + ")";
    }
    list.appendChild(item);
    item.scrollIntoView({block: "nearest"});
  }

  function connect() {
    status.textContent = "connecting";
    socket = new WebSocket(url);
    socket.onopen = function () {
      attempts = 0;
      status.textContent = "connected";
      send.disabled = false;
    };
    socket.onmessage = function (message) { show(JSON.parse(message.data)); };
    socket.onclose = function (closed) {
      send.disabled = true;
      status.textContent = "closed (" + closed.code + (closed.reason ? ": " + closed.reason : "") + ")";
      // A refused handshake (signed out, say) also reports 1006: give up after a few tries.
      if (RETRY.has(closed.code) && attempts < 5) {
        attempts += 1;
        window.setTimeout(connect, Math.min(500 * 2 ** attempts, 10000));
      }
    };
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const text = input.value.trim();
    if (text && socket && socket.readyState === WebSocket.OPEN) {
      socket.send(text);
      input.value = "";
    }
    input.focus();
  });
  connect();
})();
