// chatd chat page: WebSocket first, then Server-Sent Events, then long-poll
// as fallbacks (or the one the page asks for).  Events are ordered and de-duplicated by their per-room
// seq; user content is only ever inserted as text.  Nothing here touches
// built-in prototypes or globals.
//
// Tokens: a page opened as /rooms/NAME?token=JWT (or #token=JWT, for a
// room open to guests: a fragment never reaches a server) connects with
// that token.  If the page defines
// window.chatdGetToken (a function returning a Promise of a fresh token),
// it is asked for one before the current one expires and whenever the
// server says it has.

import {Presence, clientId} from "./presence.js";

const chat = document.getElementById("chat");
const room = chat.dataset.room;
// "websocket" (the default order), "sse" or "longpoll" (that one only).
const forced = chat.dataset.transport;
const list = document.querySelector("#message_list ul");
const scroller = document.getElementById("message_list");
const input = document.getElementById("inputbox");
const nickInput = document.getElementById("nick");
const statusEl = document.getElementById("status");
const transportEl = document.getElementById("transport");
const olderButton = document.getElementById("load_older");
const sendForm = document.getElementById("send");
const myId = chat.dataset.user || null;
const myName = document.getElementById("me")?.textContent || null;
const myRole = chat.dataset.role || null;
const canModerate = myRole === "owner" || myRole === "moderator";
let editsAllowed = chat.dataset.edits !== "false";
const editWindow = Number(chat.dataset.editWindow || 0);  // seconds; 0: no limit
// How far this user had read when the page opened (null: a guest).
const readAtOpen = chat.dataset.read === "" || chat.dataset.read === undefined ? null : Number(chat.dataset.read);
const roomTitle = document.title;
const openedAt = Number(chat.dataset.lastSeq || 0);  // the room's last seq when the page was served
const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";

const NICK_KEY = "chatd.nick";
const MAX_BACKOFF_MS = 30000;
const GROUP_MS = 5 * 60 * 1000;   // consecutive messages within this are grouped
const PAGE = 50;
const api = `/api/rooms/${encodeURIComponent(room)}`;

let lastSeq = null;          // the last seq shown; the resume cursor
let firstSeq = null;         // the oldest seq shown, for "load older"
const pending = new Map();   // client_id -> {client_id, nick, body, li}
let transport = null;        // the live transport object
let attempts = 0;            // failed connections in a row
let wsFailures = 0;          // WebSocket opens that failed before one worked
let wsWorked = false;
let sseFailures = 0;         // event streams that failed before one worked
let sseWorked = false;
let retryTimer = null;
let retryTicker = null;
let stopped = false;         // the server said this page may no longer read the room
let token = null;            // the token connections carry, if any
let tokenExpires = null;     // its exp (seconds)
let refreshTimer = null;
let mutedTimer = null;       // lifts a timed mute on this page
// Who is here and who is typing (static/presence.js); every transport
// asks for its frames with presenceQuery.
const presence = new Presence({
  myId,
  myNick: () => (nickInput ? nickInput.value.trim() : ""),
  send: (on) => { if (transport && transport.open) transport.typing(on); },
});
const clientQuery = `client=${encodeURIComponent(clientId())}`;
const presenceQuery = `presence=1&${clientQuery}`;

{
  // The page was opened with ?token=JWT (the server needed it to serve a
  // room that is not open to guests) or #token=JWT: connect with it, and
  // take it out of the address bar.
  const query = new URLSearchParams(location.search);
  const given = query.get("token")
    || (location.hash.startsWith("#token=") ? decodeURIComponent(location.hash.slice(7)) : null);
  if (given) {
    token = given;
    tokenExpires = expiryOf(token);
    query.delete("token");
    const rest = query.toString();
    history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : ""));
  }
}

function expiryOf(jwt) {
  try {
    const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)).exp || null;
  } catch (err) {
    return null;
  }
}

async function freshToken() {
  // The embedding application's hook, if it gave one.
  if (typeof window.chatdGetToken !== "function") return false;
  try {
    token = await window.chatdGetToken();
    tokenExpires = expiryOf(token);
    return true;
  } catch (err) {
    return false;
  }
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  if (!token || !tokenExpires || typeof window.chatdGetToken !== "function") return;
  // A minute before it expires (at once if it is that close already).
  const wait = Math.max(0, tokenExpires * 1000 - Date.now() - 60000);
  refreshTimer = setTimeout(async () => {
    if (await freshToken() && transport && transport.reauth) transport.reauth();
    scheduleRefresh();
  }, wait);
}

function withToken(url) {
  if (!token) return url;
  return `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
}

// Opening a room shows its newest page of history, on every transport
// ("load older" pages back): the page says where the room was when it was
// served, and the first connection starts a page before that.
if (chat.dataset.lastSeq !== undefined && chat.dataset.lastSeq !== "") {
  lastSeq = Math.max(0, Number(chat.dataset.lastSeq) - PAGE);
}

if (nickInput) {
  nickInput.value = localStorage.getItem(NICK_KEY) || "";
  nickInput.addEventListener("change", () => {
    localStorage.setItem(NICK_KEY, nickInput.value.trim());
  });
}

function setStatus(state, text) {
  statusEl.dataset.state = state;
  statusEl.textContent = text;
}

function nearBottom() {
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
}

function toBottom() {
  scroller.scrollTop = scroller.scrollHeight;
}

const URL_RE = /\bhttps?:\/\/[^\s<>"']+/g;

function trimUrl(url) {
  // Punctuation that ends a sentence is not part of the link, nor is a
  // closing bracket the link did not open: "(see https://x.org/docs)."
  for (;;) {
    const end = url[url.length - 1];
    if (".,;:!?'".includes(end)) {
      url = url.slice(0, -1);
    } else if (end === ")" && (url.match(/\(/g) || []).length < (url.match(/\)/g) || []).length) {
      url = url.slice(0, -1);
    } else {
      return url;
    }
  }
}

const MENTION_RE = /(^|[^\w@])@([A-Za-z0-9_][A-Za-z0-9_.-]*[A-Za-z0-9_]|[A-Za-z0-9_])/g;

function mentionsMe(name) {
  const wanted = name.toLowerCase();
  return (myId !== null && wanted === myId.toLowerCase())
    || (myName !== null && wanted === myName.replace(/\s+/g, "").toLowerCase());
}

function appendMentions(parent, text) {
  // @name is highlighted; @you more so (and the message is marked).
  let last = 0;
  for (const match of text.matchAll(MENTION_RE)) {
    const start = match.index + match[1].length;
    parent.append(document.createTextNode(text.slice(last, start)));
    const span = document.createElement("span");
    span.className = "mention";
    span.textContent = `@${match[2]}`;
    if (mentionsMe(match[2])) {
      span.classList.add("me");
      parent.closest?.("li")?.classList.add("mentioned");
    }
    parent.append(span);
    last = start + 1 + match[2].length;
  }
  parent.append(document.createTextNode(text.slice(last)));
}

function appendText(parent, text) {
  // Links become <a> elements whose text and href are set as data, never
  // parsed as HTML; only http(s) URLs match.  Line breaks are kept (the
  // body's white-space is pre-wrap).
  let last = 0;
  for (const match of text.matchAll(URL_RE)) {
    const url = trimUrl(match[0]);
    appendMentions(parent, text.slice(last, match.index));
    const a = document.createElement("a");
    a.href = url;
    a.textContent = url;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    parent.append(a);
    last = match.index + url.length;
  }
  appendMentions(parent, text.slice(last));
}

function renderMember(msg) {
  const li = document.createElement("li");
  li.className = "notice member";
  li.dataset.seq = msg.seq;
  const who = msg.user ? msg.user.name : "someone";
  li.textContent = msg.role ? `${who} is now a ${msg.role} of this room` : `${who} is no longer a member of this room`;
  return li;
}

function untilText(until) {
  if (until === null || until === undefined) return "";
  return ` until ${new Date(until * 1000).toLocaleString([], {dateStyle: "short", timeStyle: "short"})}`;
}

function renderModeration(msg) {
  const li = document.createElement("li");
  li.className = `notice moderation ${msg.action}`;
  li.dataset.seq = msg.seq;
  const who = msg.user ? msg.user.name : "someone";
  const by = msg.by ? msg.by.name : "The server";
  const verbs = {kick: "removed", ban: "banned", unban: "lifted the ban on", mute: "muted", unmute: "unmuted"};
  const reason = msg.reason ? `: ${msg.reason}` : "";
  li.textContent = `${by} ${verbs[msg.action] || msg.action} ${who}${untilText(msg.until)}${reason}`;
  return li;
}

function renderRoomEvent(msg) {
  const li = document.createElement("li");
  li.className = "notice room-event";
  li.dataset.seq = msg.seq;
  const by = msg.by ? msg.by.name : "The server";
  li.textContent = msg.topic ? `${by} set the topic: ${msg.topic}` : `${by} cleared the topic`;
  if (!msg.edits) li.textContent += " (edits are off)";
  return li;
}

function render(msg) {
  if (msg.type === "member") return renderMember(msg);
  if (msg.type === "moderation") return renderModeration(msg);
  if (msg.type === "room") return renderRoomEvent(msg);
  return renderMessage(msg);
}

// The text each shown message was sent with (for editing it).
const rawBodies = new WeakMap();

function fillBody(li, body, text) {
  body.replaceChildren();
  appendText(body, text);
  rawBodies.set(li, text);
}

function markDeleted(li) {
  li.classList.add("deleted");
  li.querySelector(".edited")?.remove();
  li.querySelector(".actions")?.remove();
  const body = li.querySelector(".body");
  body.replaceChildren("message deleted");
  li.classList.remove("mentioned");
}

function markEdited(li, ts) {
  let mark = li.querySelector(".edited");
  if (!mark) {
    mark = document.createElement("span");
    mark.className = "edited";
    mark.textContent = "(edited)";
    li.querySelector(".body").after(" ", mark);
  }
  mark.title = `edited ${new Date(ts * 1000).toLocaleString()}`;
}

function applyChange(msg) {
  // An edit or deletion of a message this page shows: the message changes
  // in place (a message this page does not show is as the history says).
  const li = list.querySelector(`li.message[data-seq="${msg.target_seq}"]`);
  if (!li || li.classList.contains("deleted")) return;
  closeEditor(li);
  if (msg.type === "delete") {
    markDeleted(li);
    return;
  }
  li.classList.remove("mentioned");
  fillBody(li, li.querySelector(".body"), msg.body);
  markEdited(li, msg.ts);
}

const memberList = document.getElementById("member_list");
const membersSummary = document.getElementById("members_summary");

function memberChanged(msg) {
  // Keep the members panel as the events say (the page's own list was
  // right when it was served).
  if (!memberList || !msg.user) return;
  let li = memberList.querySelector(`li[data-user="${CSS.escape(msg.user.id)}"]`);
  if (!msg.role) {
    if (li) li.remove();
  } else if (!li) {
    li = document.createElement("li");
    li.dataset.user = msg.user.id;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = msg.user.name;
    const uid = document.createElement("span");
    uid.className = "uid";
    uid.textContent = `@${msg.user.id}`;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = msg.role;
    li.append(name, " ", uid, " ", role);
    memberList.append(li);
  } else {
    const role = li.querySelector(".role");
    if (role) role.textContent = msg.role;
  }
  const count = memberList.children.length;
  membersSummary.textContent = `${count} member${count === 1 ? "" : "s"}`;
}

function renderMessage(msg) {
  const li = document.createElement("li");
  li.className = "message";
  if (msg.seq !== undefined) li.dataset.seq = msg.seq;
  li.dataset.nick = msg.nick;
  // Grouped by who sent them: a user by id, a guest by nick.
  li.dataset.sender = msg.user ? `user:${msg.user.id}` : `guest:${msg.nick}`;
  li.dataset.ts = msg.ts;
  const nick = document.createElement("span");
  nick.className = "nick";
  if (msg.user) {
    nick.textContent = msg.user.name;
    nick.title = `@${msg.user.id}`;
    if (msg.user.id === myId) li.classList.add("mine");
    // Two users may share a display name: the id tells them apart
    // (unless it is the name itself).
    if (msg.user.id.toLowerCase() !== msg.user.name.toLowerCase()) {
      const uid = document.createElement("span");
      uid.className = "uid";
      uid.textContent = `@${msg.user.id}`;
      nick.append(" ", uid);
    }
  } else {
    nick.textContent = msg.nick;
    if (msg.seq !== undefined) {
      const badge = document.createElement("span");
      badge.className = "badge guest";
      badge.textContent = "guest";
      nick.append(" ", badge);
    }
  }
  const time = document.createElement("time");
  time.className = "time";
  const when = new Date(msg.ts * 1000);
  time.dateTime = when.toISOString();
  time.textContent = when.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  time.title = when.toLocaleString();
  const body = document.createElement("span");
  body.className = "body";
  li.append(nick, time, body);
  if (msg.user) {
    li.dataset.userId = msg.user.id;
    li.dataset.userName = msg.user.name;
  }
  li.dataset.day = when.toLocaleDateString([], {weekday: "long", year: "numeric", month: "long", day: "numeric"});
  if (msg.deleted) {
    markDeleted(li);
    return li;
  }
  fillBody(li, body, msg.body);
  if (msg.edited) markEdited(li, msg.edited);
  const mine = msg.user && msg.user.id === myId;
  if (msg.seq !== undefined && (mine || canModerate)) {
    const actions = document.createElement("span");
    actions.className = "actions";
    const button = document.createElement("button");
    button.type = "button";
    button.className = "menu-button";
    button.textContent = "⋯";
    button.title = "edit, delete…";
    button.setAttribute("aria-label", "message actions");
    button.setAttribute("aria-haspopup", "menu");
    button.addEventListener("click", (event) => {
      event.stopPropagation();
      toggleMenu(li);
    });
    actions.append(button);
    li.append(" ", actions);
  }
  return li;
}

// -- the message menu: edit, delete, and a moderator's actions -------------

function closeMenus(except = null) {
  for (const menu of list.querySelectorAll(".menu")) {
    if (menu !== except) menu.remove();
  }
}

function menuItem(menu, label, action, confirmText = null) {
  const item = document.createElement("button");
  item.type = "button";
  item.setAttribute("role", "menuitem");
  item.textContent = label;
  item.dataset.action = label.split(" ")[0].toLowerCase();
  item.addEventListener("click", (event) => {
    event.stopPropagation();
    if (confirmText && !item.classList.contains("confirm")) {
      // A second click does it: nothing is deleted or banned by a slip.
      item.classList.add("confirm");
      item.textContent = confirmText;
      return;
    }
    menu.remove();
    action();
  });
  menu.append(item);
}

function toggleMenu(li) {
  const open = li.querySelector(".menu");
  closeMenus();
  if (open) return;
  const seq = Number(li.dataset.seq);
  const userId = li.dataset.userId || null;
  const mine = userId !== null && userId === myId;
  const menu = document.createElement("span");
  menu.className = "menu";
  menu.setAttribute("role", "menu");
  const fresh = editWindow === 0 || Date.now() / 1000 - Number(li.dataset.ts) < editWindow;
  if (mine && editsAllowed && fresh) menuItem(menu, "Edit", () => openEditor(li));
  if (mine || canModerate) menuItem(menu, "Delete", () => act("DELETE", `${api}/messages/${seq}`), "Delete? Click again");
  if (canModerate && userId !== null && !mine) {
    const name = li.dataset.userName || userId;
    menuItem(menu, `Mute ${name} for 10 minutes`, () => moderate(userId, "mute", 600));
    menuItem(menu, `Kick ${name}`, () => moderate(userId, "kick"), `Kick ${name}? Click again`);
    menuItem(menu, `Ban ${name}`, () => moderate(userId, "ban"), `Ban ${name}? Click again`);
  }
  if (!menu.children.length) return;
  li.querySelector(".actions").append(menu);
  menu.querySelector("button").focus();
}

document.addEventListener("click", () => closeMenus());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeMenus();
});

async function call(method, path, payload) {
  // The HTTP API, as this page is allowed to use it (its token or its
  // session cookie, with the CSRF token).
  const headers = {"X-CSRF-Token": csrf};
  if (payload !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, {
    method, headers, body: payload === undefined ? undefined : JSON.stringify(payload),
  });
  const answer = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(answer?.detail || `${method} ${path}: ${response.status}`);
    error.status = response.status;
    error.code = answer?.error;
    throw error;
  }
  return answer;
}

async function act(method, path, payload) {
  try {
    return await call(method, path, payload);
  } catch (err) {
    notice(err.message, "error");
    return null;
  }
}

function moderate(user, action, duration = null, reason = null) {
  const payload = {user, action};
  if (duration) payload.duration = duration;
  if (reason) payload.reason = reason;
  return act("POST", `${api}/moderation`, payload);
}

function openEditor(li) {
  const body = li.querySelector(".body");
  const editor = document.createElement("textarea");
  editor.className = "editbox";
  editor.rows = 1;
  editor.maxLength = 4096;
  editor.value = rawBodies.get(li) || body.textContent;
  editor.setAttribute("aria-label", "edit your message (Enter saves, Escape cancels)");
  body.hidden = true;
  body.after(editor);
  editor.focus();
  editor.addEventListener("click", (event) => event.stopPropagation());
  editor.addEventListener("keydown", async (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      closeEditor(li);
    } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      const text = editor.value.trim();
      if (!text || text === rawBodies.get(li)) {
        closeEditor(li);
        return;
      }
      editor.disabled = true;
      const answer = await act("PATCH", `${api}/messages/${li.dataset.seq}`, {body: text});
      editor.disabled = false;
      // The edit shows when its event arrives, in seq order, as everyone
      // sees it; the answer only closes the editor.
      if (answer) closeEditor(li);
      else editor.focus();
    }
  });
}

function closeEditor(li) {
  const editor = li.querySelector(".editbox");
  if (!editor) return;
  editor.remove();
  li.querySelector(".body").hidden = false;
}

function regroup(li) {
  // A message continues its group when the one before it is by the same
  // sender and recent: the nick and time are then hidden.
  // A message of another day than the one before it starts with the date.
  let prev = li.previousElementSibling;
  while (prev && !prev.dataset.day) prev = prev.previousElementSibling;
  if (li.dataset.day) li.classList.toggle("new-day", !prev || prev.dataset.day !== li.dataset.day);
  const before = li.previousElementSibling;
  const same = before && before.classList.contains("message")
    && before.dataset.sender === li.dataset.sender
    && (li.dataset.ts - before.dataset.ts) * 1000 < GROUP_MS
    && !li.classList.contains("new-day") && !li.classList.contains("first-unread");
  li.classList.toggle("cont", Boolean(same));
}

const emptyRoom = document.getElementById("empty_room");
const newMessages = document.getElementById("new_messages");
const sentByMe = new Set();  // client_ids this page sent (its own messages)
if (chat.dataset.lastSeq === "0") emptyRoom.hidden = false;

function show(msg) {
  if (lastSeq !== null && msg.seq <= lastSeq) return;  // seen already
  const stick = nearBottom();
  lastSeq = msg.seq;
  if (firstSeq === null) firstSeq = msg.seq;
  if (msg.type === "edit" || msg.type === "delete") {
    applyChange(msg);
    return;
  }
  const mine = msg.client_id && pending.get(msg.client_id);
  if (mine) {
    pending.delete(msg.client_id);
    mine.li.remove();
  }
  emptyRoom.hidden = true;
  const li = render(msg);
  if (msg.client_id && sentByMe.has(msg.client_id)) li.classList.add("mine");
  if (msg.type === "message") arrived(li, msg);
  // Scrolled up to read while messages arrive: a button to come back.
  if (!stick && !mine && msg.type === "message") newMessages.hidden = false;
  if (msg.type === "member") memberChanged(msg);
  list.insertBefore(li, list.querySelector("li.pending"));
  regroup(li);
  if (li.nextElementSibling) regroup(li.nextElementSibling);
  if (stick || mine) toBottom();
  olderButton.hidden = firstSeq <= 1;
  // After the event's own line: what it means for this reader.
  if (msg.type === "moderation") moderated(msg);
  if (msg.type === "room") roomChanged(msg);
  seen();
}

function reset(first) {
  // The server no longer holds what came after our cursor: start over
  // from what it has, keeping unsent messages.
  for (const li of list.querySelectorAll("li:not(.pending)")) li.remove();
  lastSeq = first - 1;
  firstSeq = null;
}

function notice(text, kind = "notice") {
  const li = document.createElement("li");
  li.className = `notice ${kind}`;
  li.textContent = text;
  list.insertBefore(li, list.querySelector("li.pending"));
  toBottom();
}

async function loadOlder() {
  if (firstSeq === null || firstSeq <= 1) return;
  olderButton.disabled = true;
  try {
    const batch = await getJSON(`${api}/messages?before=${firstSeq}&limit=${PAGE}`);
    const anchor = list.firstElementChild;
    const height = scroller.scrollHeight;
    for (const msg of batch.messages) {
      // The messages are as they are now: older edits change nothing.
      if (msg.type === "edit" || msg.type === "delete") continue;
      const li = render(msg);
      list.insertBefore(li, anchor);
      regroup(li);
    }
    if (anchor) regroup(anchor);
    if (batch.messages.length) firstSeq = batch.messages[0].seq;
    olderButton.hidden = batch.messages.length < PAGE || firstSeq <= 1;
    // Keep what the reader was looking at in place.
    scroller.scrollTop += scroller.scrollHeight - height;
  } catch (err) {
    notice("Could not load older messages.", "error");
  } finally {
    olderButton.disabled = false;
  }
}

function newClientId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function queue(body) {
  const nick = nickInput ? nickInput.value.trim() || undefined : undefined;
  const item = {client_id: newClientId(), nick, body};
  sentByMe.add(item.client_id);
  const me = myId ? {id: myId, name: document.getElementById("me")?.textContent || myId} : null;
  const li = renderMessage({nick: item.nick || "anonymous", user: me, body, ts: Date.now() / 1000});
  li.classList.add("pending");
  li.title = "sending…";
  list.append(li);
  toBottom();
  item.li = li;
  pending.set(item.client_id, item);
  if (transport && transport.open) transport.send(item);
}

function failed(clientId, detail, retryAfter) {
  // A refused send keeps its text, with a "retry" button; one refused
  // for coming too fast is sent again by itself once the server says.
  const item = pending.get(clientId);
  if (item) {
    pending.delete(clientId);
    item.li.classList.replace("pending", "failed");
    item.li.title = detail;
    if (!item.li.querySelector("button.retry")) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "retry";
      button.textContent = "retry";
      button.addEventListener("click", () => retry(item));
      item.li.append(" ", button);
    }
    const wait = Number(retryAfter);
    if (wait > 0) item.timer = setTimeout(() => retry(item), wait * 1000);
  }
  notice(detail, "error");
}

function retry(item) {
  // The same client_id: if the first try was stored after all, the
  // server answers with it, and nothing is stored twice.
  clearTimeout(item.timer);
  if (stopped || pending.has(item.client_id)) return;
  item.li.classList.replace("failed", "pending");
  item.li.title = "sending…";
  const button = item.li.querySelector("button.retry");
  if (button) button.remove();
  pending.set(item.client_id, item);
  if (transport && transport.open) transport.send(item);
}

function connected() {
  attempts = 0;
  reconnectNow.hidden = true;
  setStatus("connected", "connected");
  transportEl.textContent = transport.name;
  for (const item of pending.values()) transport.send(item);
}

function stop(text) {
  // The server will not let this page read the room again (removed from
  // it, kicked, banned, signed out): no more reconnecting.
  if (stopped) return;
  stopped = true;
  clearTimeout(mutedTimer);
  input.placeholder = text;
  transport = null;
  reconnectNow.hidden = true;
  clearTimeout(refreshTimer);
  setStatus("stopped", "disconnected");
  notice(text, "error");
  input.disabled = true;
  for (const button of sendForm.querySelectorAll("button")) button.disabled = true;
}

async function whyRefused(status) {
  // A 404 is a room this page may no longer read; whether because its
  // reader was removed or signed out, /api/me says.
  if (myId && !token) {
    try {
      const me = await getJSON("/api/me");
      if (!me.user) return "You were signed out; sign in again to keep chatting.";
    } catch (err) {
      // fall through
    }
  }
  return status === 404 ? "You are no longer a member of this room." : "You were signed out; sign in again to keep chatting.";
}

function disconnected(retryNow = false) {
  transport = null;
  if (stopped) return;
  if (retryNow) {
    connect();
    return;
  }
  attempts += 1;
  // Exponential backoff with jitter, capped: half the delay is fixed,
  // half random, so clients do not come back all at once.
  const delay = Math.min(MAX_BACKOFF_MS, 500 * 2 ** Math.min(attempts, 10));
  const wait = Math.round(delay / 2 + Math.random() * delay / 2);
  const until = Date.now() + wait;
  const tick = () => {
    if (!navigator.onLine) {
      setStatus("offline", "offline");
    } else {
      setStatus("reconnecting", `reconnecting in ${Math.max(1, Math.ceil((until - Date.now()) / 1000))} s`);
    }
  };
  tick();
  reconnectNow.hidden = false;
  retryTicker = setInterval(tick, 1000);
  retryTimer = setTimeout(() => {
    clearInterval(retryTicker);
    retryTimer = null;
    connect();
  }, wait);
}

const reconnectNow = document.getElementById("reconnect_now");
reconnectNow.addEventListener("click", () => {
  // Not waiting out the backoff.
  if (retryTimer === null) return;
  clearTimeout(retryTimer);
  clearInterval(retryTicker);
  retryTimer = null;
  connect();
});

function payload(item) {
  return {type: "message", nick: item.nick, body: item.body, client_id: item.client_id};
}

class WebSocketTransport {
  constructor() {
    this.name = "websocket";
    this.open = false;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const after = lastSeq === null ? "" : `after=${lastSeq}&`;
    const url = withToken(`${scheme}://${location.host}/ws/${encodeURIComponent(room)}?${after}${presenceQuery}`);
    this.token = token;
    this.ws = new WebSocket(url);
    this.ws.onopen = () => {
      this.open = true;
      wsWorked = true;
      wsFailures = 0;
      // A fresh token came while connecting: hand it over.
      if (token !== this.token) this.reauth();
      connected();
    };
    this.ws.onmessage = (event) => this.receive(JSON.parse(event.data));
    this.ws.onclose = async (event) => {
      const wasOpen = this.open;
      this.open = false;
      if (event.code === 4003) {
        stop("You are no longer a member of this room.");
        return;
      }
      if (event.code === 4004 || event.code === 4005) {
        // Kicked or banned: the moderation event said so first.
        stop(event.reason || "A moderator removed you from this room.");
        return;
      }
      if (event.code === 4001) {
        // The token expired, or the session was ended.
        if (await freshToken()) {
          disconnected(true);
        } else {
          stop(event.reason || "You were signed out; sign in again to keep chatting.");
        }
        return;
      }
      if (!wasOpen && !wsWorked) {
        // It never opened: try once more at once, then fall back to
        // long-poll (a proxy or firewall may block WebSocket).
        wsFailures += 1;
        disconnected(true);
        return;
      }
      disconnected();
    };
  }

  reauth() {
    if (this.open && token) {
      this.token = token;
      this.ws.send(JSON.stringify({type: "auth", token}));
    }
  }

  receive(frame) {
    if ("seq" in frame && frame.type !== "read") show(frame);
    else if (frame.type === "reset") reset(frame.first_seq);
    else if (frame.type === "presence" || frame.type === "typing") presence.receive(frame);
    else if (frame.type === "error") {
      if (frame.client_id) failed(frame.client_id, frame.detail, frame.retry_after);
      else notice(frame.detail, "error");
    }
  }

  send(item) {
    this.ws.send(JSON.stringify(payload(item)));
  }

  typing(on) {
    const nick = nickInput ? nickInput.value.trim() || undefined : undefined;
    this.ws.send(JSON.stringify({type: "typing", typing: on, nick}));
  }
}

class LongPollTransport {
  constructor() {
    this.name = "long-poll";
    this.open = false;
    this.run();
  }

  async run() {
    try {
      // Connected only once the server has answered (so that an outage
      // keeps backing off instead of looking connected between tries).
      const info = await getJSON(withToken(api));
      if (lastSeq === null) {
        // First visit: the newest page of history, then follow from there.
        const newest = await getJSON(withToken(`${api}/messages?before=${info.last_seq + 1}&limit=${PAGE}`));
        for (const msg of newest.messages) show(msg);
        lastSeq = Math.max(lastSeq ?? 0, info.last_seq);
        olderButton.hidden = firstSeq === null || firstSeq <= 1;
      }
      this.open = true;
      connected();
      for (;;) {
        // presence=VERSION: the presence this page has seen (a change since
        // is answered at once).
        const seen = `presence=${encodeURIComponent(this.seen || "1")}&${clientQuery}`;
        const batch = await getJSON(withToken(`${api}/messages?after=${lastSeq}&timeout=25&${seen}`));
        if (batch.presence) this.seen = batch.presence.version;
        presence.answer(batch);
        if (batch.reset) reset(batch.first_seq);
        for (const msg of batch.messages) show(msg);
        if (batch.reset && !batch.messages.length) lastSeq = batch.last_seq;
      }
    } catch (err) {
      this.open = false;
      if (err.status === 403 && err.code === "banned") {
        stop(err.message);
      } else if (err.status === 404 || (err.status === 401 && !(await freshToken()))) {
        stop(await whyRefused(err.status));
      } else {
        disconnected(err.status === 401);
      }
    }
  }

  send(item) {
    post(item);
  }

  typing(on) {
    postTyping(on);
  }
}

async function postTyping(on) {
  // Long-poll and SSE pages say they type over HTTP; a refusal (a rate
  // limit) costs nothing but the signal.
  const headers = {"Content-Type": "application/json", "X-CSRF-Token": csrf};
  if (token) headers.Authorization = `Bearer ${token}`;
  const nick = nickInput ? nickInput.value.trim() || undefined : undefined;
  try {
    await fetch(`${api}/typing`, {
      method: "POST",
      headers,
      body: JSON.stringify({typing: on, nick, client: clientId()}),
    });
  } catch (err) {
    // Offline: the next start (or the server's expiry) sets it right.
  }
}

async function post(item) {
  // Long-poll and SSE pages post over HTTP.
  try {
    const headers = {"Content-Type": "application/json", "X-CSRF-Token": csrf};
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(`${api}/messages`, {
      method: "POST",
      headers,
      body: JSON.stringify(payload(item)),
    });
    const answer = await response.json();
    if (!response.ok) failed(item.client_id, answer.detail, response.headers.get("Retry-After"));
    // Success shows up through the stream, in seq order, like anyone else's.
  } catch (err) {
    // Still pending: it is sent again on reconnect, and client_id
    // makes the retry safe.
  }
}

class EventStreamTransport {
  // Server-Sent Events: every event carries its seq as its id, so the
  // browser's own reconnects (after the server ends a stream, or a blip)
  // resume with Last-Event-ID, exactly once.
  constructor() {
    this.name = "sse";
    this.open = false;
    const after = lastSeq === null ? "" : `after=${lastSeq}&`;
    this.es = new EventSource(withToken(`${api}/events?${after}${presenceQuery}`));
    this.dropped = null;
    this.es.onopen = () => {
      clearTimeout(this.dropped);
      this.dropped = null;
      this.open = true;
      sseWorked = true;
      sseFailures = 0;
      connected();
    };
    this.es.onmessage = (event) => show(JSON.parse(event.data));
    this.es.addEventListener("reset", (event) => reset(JSON.parse(event.data).first_seq));
    for (const kind of ["presence", "typing"]) {
      this.es.addEventListener(kind, (event) => presence.receive(JSON.parse(event.data)));
    }
    this.es.addEventListener("revoked", (event) => {
      this.es.close();
      const why = JSON.parse(event.data);
      stop(why.detail || "You are no longer a member of this room.");
    });
    this.es.onerror = () => this.failed();
  }

  async failed() {
    if (this.es.readyState !== EventSource.CLOSED) {
      // The browser reconnects by itself (the server ends every stream
      // after a minute): "reconnecting" only if that takes a while.
      if (this.dropped === null) {
        this.dropped = setTimeout(() => {
          this.dropped = null;
          if (transport === this && this.es.readyState !== EventSource.OPEN) {
            setStatus("reconnecting", "reconnecting…");
          }
        }, 2000);
      }
      return;
    }
    clearTimeout(this.dropped);
    const wasOpen = this.open;
    this.open = false;
    if (transport !== this) return;
    if (!wasOpen && !sseWorked && !wsWorked && forced !== "sse") {
      // It never opened: once more, then long-poll.
      sseFailures += 1;
      disconnected(true);
      return;
    }
    // Refused: say why, or try again later.
    try {
      await getJSON(withToken(api));
    } catch (err) {
      if (err.status === 403 && err.code === "banned") {
        stop(err.message);
        return;
      }
      if (err.status === 404 || (err.status === 401 && !(await freshToken()))) {
        stop(await whyRefused(err.status));
        return;
      }
    }
    disconnected();
  }

  send(item) {
    post(item);
  }

  typing(on) {
    postTyping(on);
  }
}

async function getJSON(url) {
  const response = await fetch(url, {cache: "no-store"});
  if (!response.ok) {
    const answer = await response.json().catch(() => null);
    const error = new Error(answer?.detail || `${url}: ${response.status}`);
    error.status = response.status;
    error.code = answer?.error;
    throw error;
  }
  return response.json();
}

function connect() {
  if (stopped) return;
  setStatus("connecting", "connecting…");
  if (forced === "longpoll") {
    transport = new LongPollTransport();
  } else if (forced === "sse") {
    transport = new EventStreamTransport();
  } else if ("WebSocket" in window && wsFailures < 2) {
    transport = new WebSocketTransport();
  } else if (typeof window.EventSource === "function" && sseFailures < 2) {
    transport = new EventStreamTransport();
  } else {
    transport = new LongPollTransport();
  }
}

input.addEventListener("keydown", (event) => {
  // Enter sends; Shift+Enter starts a new line.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendForm.requestSubmit();
  }
});
input.addEventListener("input", () => {
  // The box grows with what is typed, up to a few lines.
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
});

newMessages.addEventListener("click", () => {
  toBottom();
  newMessages.hidden = true;
});
scroller.addEventListener("scroll", () => {
  if (nearBottom()) newMessages.hidden = true;
});

sendForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const body = input.value.trim();
  if (!body) return;
  input.value = "";
  input.style.height = "auto";
  if (nickInput) localStorage.setItem(NICK_KEY, nickInput.value.trim());
  presence.stopTyping();
  queue(body);
});
presence.attach(input);

olderButton.addEventListener("click", loadOlder);

// Back from adding or removing a member: the panel stays open.
const panel = document.getElementById("member_panel");
if (panel && location.hash === "#members") panel.open = true;

window.addEventListener("offline", () => setStatus("offline", "offline"));
window.addEventListener("online", () => {
  if (retryTimer !== null) {
    // Back online: retry now rather than at the end of the backoff.
    clearTimeout(retryTimer);
    clearInterval(retryTicker);
    retryTimer = null;
    connect();
  }
});

// -- moderation, the topic, mutes --------------------------------------------

function moderated(msg) {
  // Only what happened since the page was served (the server's answer
  // for the page already said what earlier events left in force).
  if (!msg.user || msg.user.id !== myId || msg.seq <= openedAt) return;
  const reason = msg.reason ? ` (${msg.reason})` : "";
  if (msg.action === "ban") {
    stop(`You were banned from this room${untilText(msg.until)}${reason}.`);
  } else if (msg.action === "kick") {
    stop(`A moderator removed you from this room${reason}.`);
    const again = document.createElement("a");
    again.href = withToken(location.pathname);
    again.textContent = "Come back";
    again.id = "rejoin";
    list.lastElementChild?.append(" ", again);
  } else if (msg.action === "mute") {
    setMuted(msg.until);
  } else if (msg.action === "unmute") {
    setMuted(null);
  }
}

function setMuted(until) {
  // Muted: the page may read, not send (the server refuses it anyway).
  clearTimeout(mutedTimer);
  const muted = until !== null && until !== undefined && until !== false;
  input.disabled = muted || stopped;
  for (const button of sendForm.querySelectorAll("button")) button.disabled = muted || stopped;
  input.placeholder = muted
    ? `You are muted${until === "forever" ? "" : untilText(until)}: you can read, not send.`
    : "Say something, then Enter (Shift+Enter: a new line)";
  if (muted && until !== "forever") {
    // Timers hold at most 2^31 - 1 ms (24.8 days): a longer mute waits
    // in steps.
    const left = until * 1000 - Date.now();
    mutedTimer = setTimeout(() => setMuted(left > 2 ** 31 - 1 ? until : null), Math.min(Math.max(0, left) + 500, 2 ** 31 - 1));
  }
}

if (chat.dataset.muted) setMuted(chat.dataset.muted === "forever" ? "forever" : Number(chat.dataset.muted));

const topicEl = document.getElementById("topic");

function roomChanged(msg) {
  topicEl.textContent = msg.topic;
  editsAllowed = msg.edits;
}

const editTopic = document.getElementById("edit_topic");
if (editTopic) {
  editTopic.addEventListener("click", () => {
    if (document.getElementById("topic_input")) return;
    const box = document.createElement("input");
    box.id = "topic_input";
    box.maxLength = 200;
    box.value = topicEl.textContent;
    box.setAttribute("aria-label", "the room's topic (Enter saves, Escape cancels)");
    topicEl.hidden = true;
    topicEl.after(box);
    box.focus();
    box.addEventListener("keydown", async (event) => {
      if (event.key === "Escape") {
        box.remove();
        topicEl.hidden = false;
      } else if (event.key === "Enter") {
        event.preventDefault();
        if (await act("PATCH", api, {topic: box.value})) {
          box.remove();
          topicEl.hidden = false;
        }
      }
    });
  });
}

const moderationPanel = document.getElementById("moderation_panel");

async function listRestrictions() {
  const answer = await act("GET", `${api}/moderation`);
  if (!answer) return;
  const ul = document.getElementById("restrictions");
  ul.replaceChildren();
  for (const [kind, lift, entries] of [["banned", "unban", answer.bans], ["muted", "unmute", answer.mutes]]) {
    for (const entry of entries) {
      const li = document.createElement("li");
      li.dataset.user = entry.id;
      li.textContent = `${entry.name} (@${entry.id}) ${kind}${untilText(entry.until)} `;
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = lift;
      button.addEventListener("click", async () => {
        if (await moderate(entry.id, lift)) listRestrictions();
      });
      li.append(button);
      ul.append(li);
    }
  }
}

if (moderationPanel) {
  moderationPanel.addEventListener("toggle", () => {
    if (moderationPanel.open) listRestrictions();
  });
  document.getElementById("moderate_form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const user = document.getElementById("moderate_user").value.trim();
    const action = document.getElementById("moderate_action").value;
    const duration = Number(document.getElementById("moderate_duration").value) || null;
    const reason = document.getElementById("moderate_reason").value.trim() || null;
    if (await moderate(user, action, action === "ban" || action === "mute" ? duration : null, reason)) {
      document.getElementById("moderate_reason").value = "";
      listRestrictions();
    }
  });
}

// -- read markers, unread counts, the "new messages" divider -----------------

let unseen = 0;            // messages that came while this page was not looked at
let readSent = readAtOpen;  // the marker last sent to the server
let readTimer = null;
let dividerPlaced = false;

function arrived(li, msg) {
  const mine = msg.user && msg.user.id === myId;
  // Where this user left off: the first message after their marker.
  if (!dividerPlaced && readAtOpen && msg.seq > readAtOpen && msg.seq <= openedAt && !mine) {
    li.classList.add("first-unread");
    li.id = "unread_divider";
    dividerPlaced = true;
  }
  if (!mine && (document.hidden || !nearBottom())) unseen += 1;
}

function seen() {
  // The reader is here and at the bottom: everything shown is read.
  if (!document.hidden && nearBottom()) {
    unseen = 0;
    if (myId !== null && lastSeq !== null && (readSent === null || lastSeq > readSent)) {
      clearTimeout(readTimer);
      readTimer = setTimeout(sendRead, 1000);
    }
  }
  document.title = unseen ? `(${unseen}) ${roomTitle}` : roomTitle;
}

async function sendRead() {
  const upto = lastSeq;
  if (upto === null || (readSent !== null && upto <= readSent)) return;
  try {
    await call("POST", `${api}/read`, {seq: upto});
    readSent = upto;
    refreshSidebar();
  } catch (err) {
    // Kept for the next time the reader is here.
  }
}

document.addEventListener("visibilitychange", seen);
window.addEventListener("focus", seen);
scroller.addEventListener("scroll", () => {
  if (nearBottom()) seen();
});

// -- the room sidebar --------------------------------------------------------

const sidebar = document.getElementById("sidebar");
const sidebarRooms = document.getElementById("sidebar_rooms");
const sidebarToggle = document.getElementById("sidebar_toggle");
const pageSuffix = forced === "longpoll" ? "/longpoll" : forced === "sse" ? "/sse" : "";

async function refreshSidebar() {
  let answer;
  try {
    answer = await getJSON(withToken("/api/rooms"));
  } catch (err) {
    return;
  }
  sidebarRooms.replaceChildren();
  for (const info of answer.rooms) {
    const li = document.createElement("li");
    li.dataset.room = info.name;
    const a = document.createElement("a");
    a.href = `/rooms/${encodeURIComponent(info.name)}${pageSuffix}`;
    a.textContent = `#${info.name}`;
    if (info.name === room) a.setAttribute("aria-current", "page");
    li.append(a);
    if (info.private) {
      const badge = document.createElement("span");
      badge.className = "badge lock";
      badge.textContent = "private";
      li.append(" ", badge);
    }
    const unread = info.name === room ? 0 : info.unread || 0;
    if (unread) {
      const count = document.createElement("span");
      count.className = "unread";
      count.textContent = unread > 99 ? "99+" : String(unread);
      count.title = `${unread} unread`;
      li.append(" ", count);
    }
    sidebarRooms.append(li);
  }
}

sidebarToggle.addEventListener("click", () => {
  const open = sidebar.classList.toggle("open");
  sidebarToggle.setAttribute("aria-expanded", String(open));
});
window.addEventListener("focus", refreshSidebar);
setInterval(refreshSidebar, 10000);
refreshSidebar();

scheduleRefresh();
connect();
