// Review queue keyboard shortcuts: a accept, r reject, e edit, s skip, j next, k previous,
// u undo, ? help. Each key clicks the element carrying data-key (or data-key2) in the page, so
// the same htmx request runs as with the mouse and the next item is swapped in without a reload.
(function () {
  "use strict";
  // A key pressed the instant a new item is swapped in may beat htmx's processing of that item;
  // process it first (idempotent) so the request still goes through htmx, not a full page load.
  function ready(el) {
    if (window.htmx) htmx.process(el.closest("form") || el);
  }
  function help() {
    var d = document.getElementById("review-help");
    if (!d) return;
    if (d.open) d.close(); else d.showModal();
  }
  function toggleEdit(open) {
    var form = document.querySelector("#review-item [data-edit-form]");
    if (!form) return;
    form.hidden = open === undefined ? !form.hidden : !open;
    if (!form.hidden) {
      var ta = form.querySelector("textarea");
      ta.focus();
      ta.setSelectionRange(ta.value.length, ta.value.length);
    }
  }
  document.addEventListener("click", function (e) {
    if (e.target.closest("[data-edit-toggle]")) toggleEdit();
    if (e.target.closest("[data-help-open]")) help();
  });
  document.addEventListener("keydown", function (e) {
    var t = e.target;
    if (t.matches && t.matches("textarea, input, select")) {
      if (e.key === "Escape") t.blur();
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && t.form) {
        e.preventDefault();
        ready(t.form);
        t.form.requestSubmit();
      }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "?") { e.preventDefault(); help(); return; }
    if (e.key === "e") { e.preventDefault(); toggleEdit(true); return; }
    var sel = '[data-key="' + e.key + '"], [data-key2="' + e.key + '"]';
    var el = document.querySelector("#review-item " + sel) || document.querySelector(sel);
    if (el && !el.disabled) { e.preventDefault(); ready(el); el.click(); }
  });
  // Conflicts (409), refusals (403) and bad input (400) carry a message in the item partial:
  // show it instead of dropping the response, as htmx does for error statuses by default.
  document.addEventListener("htmx:beforeSwap", function (e) {
    var s = e.detail.xhr.status;
    if (s === 400 || s === 403 || s === 409) { e.detail.shouldSwap = true; e.detail.isError = false; }
  });
  // Keep keyboard focus off the swapped-out buttons so the next key works at once.
  document.addEventListener("htmx:afterSwap", function (e) {
    if (e.detail.target && e.detail.target.id === "review-item" && document.activeElement &&
        !document.body.contains(document.activeElement)) document.body.focus();
    var form = document.querySelector("#review-item [data-edit-form]:not([hidden]) textarea");
    if (form) form.focus();
  });
})();
