// chatd chat page: who is in the room and who is typing (imported by
// chat.js).  Every transport hands the server's presence and typing
// frames (or a long-poll answer's fields) to a Presence, which keeps the
// "N here" count, the presence list and the typing line; and it sends
// typing signals while the user types in the message box.  Names are only
// ever inserted as text.

// While typing, a start goes out this often (the server drops starts
// within 2 s of the last, and expires one 6 s after it).
const TYPING_EVERY_MS = 3000;
// A typer the page heard no stop for (its connection dropped meanwhile)
// is forgotten after this.
const TYPING_STALE_MS = 8000;
const CLIENT_KEY = "chatd.client";

function randomId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// This browser's id: the same in all its tabs, so that a guest with three
// tabs open is one guest.
export function clientId() {
  let id = null;
  try {
    id = localStorage.getItem(CLIENT_KEY);
    if (!id || !/^[A-Za-z0-9_-]{1,64}$/.test(id)) {
      id = randomId();
      localStorage.setItem(CLIENT_KEY, id);
    }
  } catch (err) {
    id = id || randomId();
  }
  return id;
}

function typerKey(typer) {
  return typer.user ? `user:${typer.user.id}` : `guest:${typer.nick}`;
}

export class Presence {
  // myId: the signed-in user's id (null for a guest); myNick(): the
  // guest's nick now; send(on): sends a typing start or stop on the
  // current transport.
  constructor({myId, myNick, send}) {
    this.myId = myId;
    this.myNick = myNick;
    this.send = send;
    this.users = new Map();   // id -> name
    this.guests = 0;
    this.typers = new Map();  // key -> {user, nick, timer}
    this.typing = false;      // this page said it is typing
    this.sentAt = 0;
    this.countEl = document.getElementById("members");
    this.listEl = document.getElementById("presence_list");
    this.typingEl = document.getElementById("typing");
  }

  // -- what the server says -------------------------------------------------

  receive(frame) {
    if (frame.type === "presence") {
      if (frame.users) {
        // A snapshot (the connection is new): the typers follow it.
        this.users = new Map(frame.users.map((u) => [u.id, u.name]));
        this.clearTypers();
      } else {
        for (const u of frame.joined || []) this.users.set(u.id, u.name);
        for (const id of frame.left || []) this.users.delete(id);
      }
      this.guests = frame.guests;
      this.render();
    } else if (frame.type === "typing") {
      this.typed(frame, frame.typing);
      this.renderTyping();
    }
  }

  answer(batch) {
    // A long-poll answer's "presence" and "typing": the whole state.
    if (!batch.presence) return;
    this.users = new Map(batch.presence.users.map((u) => [u.id, u.name]));
    this.guests = batch.presence.guests;
    this.clearTypers();
    for (const typer of batch.typing || []) this.typed(typer, true);
    this.render();
  }

  typed(typer, on) {
    const key = typerKey(typer);
    const old = this.typers.get(key);
    if (old) clearTimeout(old.timer);
    if (!on) {
      this.typers.delete(key);
      return;
    }
    const timer = setTimeout(() => {
      this.typers.delete(key);
      this.renderTyping();
    }, TYPING_STALE_MS);
    this.typers.set(key, {user: typer.user, nick: typer.nick, timer});
  }

  clearTypers() {
    for (const typer of this.typers.values()) clearTimeout(typer.timer);
    this.typers.clear();
  }

  // -- showing it -----------------------------------------------------------

  render() {
    const count = this.users.size + this.guests;
    if (this.countEl) this.countEl.textContent = `${count} here`;
    if (this.listEl) {
      const items = [];
      const users = [...this.users].sort((a, b) => (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : a[0] < b[0] ? -1 : 1));
      for (const [id, name] of users) {
        const li = document.createElement("li");
        li.className = "here";
        li.dataset.user = id;
        if (id === this.myId) li.classList.add("me");
        const dot = document.createElement("span");
        dot.className = "online";
        dot.setAttribute("aria-hidden", "true");
        const label = document.createElement("span");
        label.className = "name";
        label.textContent = name;
        li.title = `@${id} is here`;
        li.append(dot, label);
        items.push(li);
      }
      if (this.guests) {
        const li = document.createElement("li");
        li.className = "here guests";
        li.textContent = `${this.guests} guest${this.guests === 1 ? "" : "s"}`;
        items.push(li);
      }
      this.listEl.replaceChildren(...items);
    }
    this.renderTyping();
  }

  renderTyping() {
    if (!this.typingEl) return;
    const mine = this.myId ? null : (this.myNick() || "anonymous");
    const names = [];
    for (const typer of this.typers.values()) {
      if (typer.user ? typer.user.id === this.myId : typer.nick === mine) continue;
      names.push(typer.user ? typer.user.name : typer.nick);
    }
    let text = "";
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = `${names.length} people are typing…`;
    this.typingEl.textContent = text;
    this.typingEl.classList.toggle("idle", !text);
  }

  // -- what this page says --------------------------------------------------

  attach(input) {
    // The message box: typing starts (again every few seconds while it
    // goes on), and stops when the box is emptied or left.
    input.addEventListener("input", () => {
      if (!input.value.trim()) {
        this.stopTyping();
      } else if (!this.typing || Date.now() - this.sentAt >= TYPING_EVERY_MS) {
        this.typing = true;
        this.sentAt = Date.now();
        this.send(true);
      }
    });
    input.addEventListener("blur", () => this.stopTyping());
  }

  stopTyping() {
    // Sent, blurred or emptied.
    if (!this.typing) return;
    this.typing = false;
    this.sentAt = 0;
    this.send(false);
  }
}
