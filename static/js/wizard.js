// The release wizard's revision picker: the search box hides the tags, branches
// and commits that do not match (without JavaScript every one stays listed),
// the recent commits too when they arrive after the page (htmx swaps them in).
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    var search = document.getElementById("revision-search");
    if (!search) return;
    function filter() {
      var words = search.value.toLowerCase().trim();
      document.querySelectorAll(".picks li[data-search]").forEach(function (li) {
        li.hidden = words !== "" && li.getAttribute("data-search").indexOf(words) === -1;
      });
    }
    search.addEventListener("input", filter);
    document.body.addEventListener("htmx:afterSwap", filter);
  });
})();
