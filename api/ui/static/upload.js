// The upload page: the compress-to-budget goal fields show (and are sent) only while a goal
// pipeline is chosen. Without script they stay visible, and the server uses them only for
// that pipeline.
(function () {
  "use strict";
  function sync(select) {
    var fieldset = document.getElementById(select.dataset.goalFieldset);
    if (!fieldset) { return; }
    var option = select.options[select.selectedIndex];
    var goal = Boolean(option && option.dataset.goal);
    fieldset.hidden = !goal;
    fieldset.disabled = !goal;  // a disabled fieldset's inputs are not submitted
  }
  Array.prototype.forEach.call(document.querySelectorAll("select.preset-choice"), function (s) {
    s.addEventListener("change", function () { sync(s); });
    sync(s);
  });
})();
