// Swagger UI (vendored under static/swagger-ui, Apache-2.0) rendering this service's own openapi.json.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: new URL("openapi.json", document.baseURI).href,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null, // the default validator is a remote service; this page stays offline
  });
});
