// chatd chat page: WebSocket first, long-poll as fallback (or when the page
// asks for it).  Messages are ordered and de-duplicated by their per-room
// seq; user content is only ever inserted as text.

const chat = document.getElementById("chat");
const room = chat.dataset.room;
const forcedLongPoll = chat.dataset.transport === "longpoll";
const list = document.querySelector("#message_list ul");
const scroller = document.getElementById("message_list");
const input = document.getElementById("inputbox");
const nickInput = document.getElementById("nick");
const statusEl = document.getElementById("status");
const sendForm = document.getElementById("send");

const NICK_KEY = "chatd.nick";
const MAX_BACKOFF_MS = 30000;
const api = `/api/rooms/${encodeURIComponent(room)}`;

let lastSeq = null;          // the last seq shown; the resume cursor
const pending = new Map();   // client_id -> {nick, body, li}
let transport = null;        // the live transport object
let attempts = 0;            // failed connection attempts in a row
let wsFailures = 0;          // WebSocket opens that failed before working once
let wsWorked = false;

nickInput.value = localStorage.getItem(NICK_KEY) || "";
nickInput.addEventListener("change", () => {
  localStorage.setItem(NICK_KEY, nickInput.value.trim());
});

function setStatus(state, text) {
  statusEl.dataset.state = state;
  statusEl.textContent = text;
}

function nearBottom() {
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
}

const URL_RE = /\bhttps?:\/\/[^\s<>"']+/g;

function appendText(parent, text) {
  // Links become <a> elements whose text and href are set as data, never
  // parsed as HTML.
  let last = 0;
  for (const match of text.matchAll(URL_RE)) {
    parent.append(document.createTextNode(text.slice(last, match.index)));
    const a = document.createElement("a");
    a.href = match[0];
    a.textContent = match[0];
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    parent.append(a);
    last = match.index + match[0].length;
  }
  parent.append(document.createTextNode(text.slice(last)));
}

function renderMessage(msg, li) {
  li = li || document.createElement("li");
  li.replaceChildren();
  li.className = "message";
  li.dataset.seq = msg.seq ?? "";
  const nick = document.createElement("span");
  nick.className = "nick";
  nick.textContent = msg.nick;
  const time = document.createElement("time");
  time.className = "time";
  if (msg.ts) {
    const when = new Date(msg.ts * 1000);
    time.dateTime = when.toISOString();
    time.textContent = when.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  }
  const body = document.createElement("span");
  body.className = "body";
  appendText(body, msg.body);
  li.append(nick, time, body);
  return li;
}

function show(msg) {
  if (lastSeq !== null && msg.seq <= lastSeq) return;  // seen already
  const stick = nearBottom();
  lastSeq = msg.seq;
  const mine = msg.client_id && pending.get(msg.client_id);
  if (mine) {
    pending.delete(msg.client_id);
    mine.li.remove();
  }
  const li = renderMessage(msg);
  const firstPending = list.querySelector("li.pending");
  list.insertBefore(li, firstPending);
  if (stick || mine) scroller.scrollTop = scroller.scrollHeight;
}

function reset(firstSeq) {
  // The server no longer holds what came after our cursor: start over
  // from what it has, keeping unsent messages.
  for (const li of list.querySelectorAll("li:not(.pending)")) li.remove();
  lastSeq = firstSeq - 1;
}

function showError(detail) {
  const li = document.createElement("li");
  li.className = "notice error";
  li.textContent = detail;
  list.append(li);
  scroller.scrollTop = scroller.scrollHeight;
}

function newClientId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function queue(body) {
  const item = {client_id: newClientId(), nick: nickInput.value.trim() || undefined, body};
  const li = renderMessage({nick: item.nick || "anonymous", body, ts: Date.now() / 1000});
  li.classList.add("pending");
  li.title = "sending…";
  list.append(li);
  scroller.scrollTop = scroller.scrollHeight;
  item.li = li;
  pending.set(item.client_id, item);
  if (transport && transport.open) transport.send(item);
}

function failed(clientId, detail) {
  const item = pending.get(clientId);
  if (item) {
    pending.delete(clientId);
    item.li.classList.replace("pending", "failed");
    item.li.title = detail;
  }
  showError(detail);
}

function connected() {
  attempts = 0;
  setStatus("connected", "connected");
  for (const item of pending.values()) transport.send(item);
}

function disconnected() {
  transport = null;
  attempts += 1;
  const delay = Math.min(MAX_BACKOFF_MS, 500 * 2 ** Math.min(attempts, 10));
  const wait = Math.round(delay / 2 + Math.random() * delay / 2);
  let left = Math.ceil(wait / 1000);
  setStatus("reconnecting", `reconnecting in ${left} s`);
  const timer = setInterval(() => {
    left -= 1;
    if (left > 0) setStatus("reconnecting", `reconnecting in ${left} s`);
  }, 1000);
  setTimeout(() => { clearInterval(timer); connect(); }, wait);
}

function payload(item) {
  return {type: "message", nick: item.nick, body: item.body, client_id: item.client_id};
}

class WebSocketTransport {
  constructor() {
    this.open = false;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const after = lastSeq === null ? "" : `?after=${lastSeq}`;
    this.ws = new WebSocket(`${scheme}://${location.host}/ws/${encodeURIComponent(room)}${after}`);
    this.ws.onopen = () => {
      this.open = true;
      wsWorked = true;
      connected();
    };
    this.ws.onmessage = (event) => this.receive(JSON.parse(event.data));
    this.ws.onclose = () => {
      const wasOpen = this.open;
      this.open = false;
      if (!wasOpen && !wsWorked) wsFailures += 1;
      disconnected();
    };
  }

  receive(frame) {
    if (frame.type === "message") show(frame);
    else if (frame.type === "reset") reset(frame.first_seq);
    else if (frame.type === "error") {
      if (frame.client_id) failed(frame.client_id, frame.detail);
      else showError(frame.detail);
    }
  }

  send(item) {
    this.ws.send(JSON.stringify(payload(item)));
  }
}

class LongPollTransport {
  constructor() {
    this.open = false;
    this.run();
  }

  async run() {
    try {
      if (lastSeq === null) {
        // First visit: the newest page of history, then follow from there.
        const info = await getJSON(api);
        const older = await getJSON(`${api}/messages?before=${info.last_seq + 1}&limit=100`);
        for (const msg of older.messages) show(msg);
        lastSeq = Math.max(lastSeq ?? 0, info.last_seq);
      }
      this.open = true;
      connected();
      for (;;) {
        const batch = await getJSON(`${api}/messages?after=${lastSeq}&timeout=25`);
        if (batch.reset) reset(batch.first_seq);
        for (const msg of batch.messages) show(msg);
        if (batch.reset && !batch.messages.length) lastSeq = batch.last_seq;
      }
    } catch (err) {
      this.open = false;
      disconnected();
    }
  }

  async send(item) {
    try {
      const response = await fetch(`${api}/messages`, {
        method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify(payload(item)),
      });
      const answer = await response.json();
      if (!response.ok) failed(item.client_id, answer.detail);
      // Success shows up through the poll, in seq order, like anyone else's.
    } catch (err) {
      // Still pending: it is sent again on reconnect, and client_id
      // makes the retry safe.
    }
  }
}

async function getJSON(url) {
  const response = await fetch(url, {cache: "no-store"});
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

function connect() {
  setStatus("connecting", "connecting…");
  const useWebSocket = !forcedLongPoll && "WebSocket" in window && wsFailures < 2;
  transport = useWebSocket ? new WebSocketTransport() : new LongPollTransport();
}

sendForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const body = input.value.trim();
  if (!body) return;
  input.value = "";
  localStorage.setItem(NICK_KEY, nickInput.value.trim());
  queue(body);
});

window.addEventListener("offline", () => setStatus("offline", "offline"));

connect();
