// Fills the sign-in form with a token carried in the address's fragment
// (/console/sign-in#token=...), as the links `make demo` prints: a fragment never reaches a
// server, a log or a Referer header, and it is removed from the address bar at once. The
// page then says whose token it is, and the user presses the button: a link someone else
// sent cannot sign this browser in as them unseen.
(function () {
  "use strict";
  var match = /^#token=([A-Za-z0-9._-]+)$/.exec(window.location.hash);
  if (!match) {
    return;
  }
  window.history.replaceState(null, "", window.location.pathname + window.location.search);
  document.getElementById("token").value = match[1];
  var subject = "?";
  try {
    var payload = match[1].split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    subject = JSON.parse(window.atob(payload)).sub || "?";
  } catch (e) {
    subject = "?";
  }
  document.getElementById("token-subject").textContent = subject;
  document.getElementById("token-who").hidden = false;
  document.getElementById("sign-in-button").focus();
})();
