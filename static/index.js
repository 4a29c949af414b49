// chatd room list: create a room without leaving the page, with the
// server's error shown next to the form.

const form = document.getElementById("create_room");
const nameInput = document.getElementById("room_name");
const errorEl = document.getElementById("create_error");

function showError(text) {
  errorEl.textContent = text;
  errorEl.hidden = !text;
}

nameInput.addEventListener("input", () => {
  showError(nameInput.validity.patternMismatch
    ? "Use 1 to 64 letters, digits, '_' or '-'." : "");
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = nameInput.value.trim();
  try {
    const response = await fetch("/api/rooms", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({name}),
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
