// Signs in with a token carried in the address's fragment (/console/sign-in#token=...),
// as the links `make demo` prints: a fragment never reaches a server, a log or a Referer
// header, and it is removed from the address bar before the form is sent.
(function () {
  "use strict";
  var match = /^#token=([A-Za-z0-9._-]+)$/.exec(window.location.hash);
  if (!match) {
    return;
  }
  window.history.replaceState(null, "", window.location.pathname + window.location.search);
  document.getElementById("token").value = match[1];
  document.getElementById("sign-in").submit();
})();
