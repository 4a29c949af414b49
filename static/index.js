// chatd room list: create a room without leaving the page, with errors shown
// next to the form, and times shown in the reader's time zone.

const form = document.getElementById("create_room");
const nameInput = document.getElementById("room_name");
const errorEl = document.getElementById("create_error");

for (const time of document.querySelectorAll("time[data-ts]")) {
  const when = new Date(Number(time.dataset.ts) * 1000);
  time.dateTime = when.toISOString();
  time.title = when.toLocaleString();
  time.textContent = when.toLocaleString([], {dateStyle: "medium", timeStyle: "short"});
}

function showError(text) {
  errorEl.textContent = text;
  errorEl.hidden = !text;
  nameInput.setAttribute("aria-invalid", text ? "true" : "false");
}

function check() {
  const name = nameInput.value.trim();
  if (!name) return "Give the room a name.";
  if (name.length > 64) return "A room name is at most 64 characters.";
  if (!/^[A-Za-z0-9_-]+$/.test(name)) return "Use only letters, digits, '_' and '-'.";
  return "";
}

// The form is there for those who may create rooms.
if (form) nameInput.addEventListener("input", () => showError(nameInput.value ? check() : ""));

if (form) form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const problem = check();
  if (problem) {
    showError(problem);
    return;
  }
  const name = nameInput.value.trim();
  const privateBox = document.getElementById("room_private");
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
  try {
    const response = await fetch("/api/rooms", {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify({name, private: Boolean(privateBox && privateBox.checked)}),
    });
    if (response.status === 201) {
      location.assign(`/rooms/${encodeURIComponent(name)}`);
      return;
    }
    const answer = await response.json();
    showError(answer.detail || `Could not create the room (${response.status}).`);
  } catch (err) {
    showError("The server cannot be reached; try again.");
  }
});
