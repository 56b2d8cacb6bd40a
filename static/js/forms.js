// A form sent back with errors: the keyboard and the screen reader start at
// the first field to fix (the summary above the form lists them all).
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    var form = document.querySelector("form[data-focus-error]");
    if (!form) return;
    var first = form.querySelector("[aria-invalid=true]");
    if (first && first.tagName === "FIELDSET") first = first.querySelector("input, select, textarea") || first;
    if (first) { first.focus(); first.scrollIntoView({ block: "center" }); }
  });
  // a link in the error summary moves focus to its field, not only the view
  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest(".error-summary a[href^='#']") : null;
    if (!link) return;
    var field = document.getElementById(link.getAttribute("href").slice(1));
    if (field) { event.preventDefault(); field.focus(); field.scrollIntoView({ block: "center" }); }
  });
})();
