package agent

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestWriteAccepted(t *testing.T) {
	rec := httptest.NewRecorder()
	writeAccepted(rec)
	if rec.Code != http.StatusAccepted || rec.Body.String() != `{"status":"OK"}` ||
		rec.Header().Get("Content-Type") != "application/json" || rec.Header().Get("Content-Length") != "15" {
		t.Fatalf("202 answer: %d %q %v", rec.Code, rec.Body.String(), rec.Header())
	}
}
