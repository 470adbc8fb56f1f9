package protocol

import (
	"testing"
	"time"
)

func TestReportLine(t *testing.T) {
	got := Report{RequestID: "r", Duration: 1234 * time.Microsecond, MemoryMB: 128, MaxMemoryMB: 20,
		InitDuration: 45670 * time.Microsecond}.Line()
	want := "REPORT RequestId: r\tDuration: 1.23 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB\tMax Memory Used: 20 MB\tInit Duration: 45.67 ms\n"
	if got != want {
		t.Fatalf("got  %q\nwant %q", got, want)
	}
	got = Report{RequestID: "r", Duration: 3 * time.Second, MemoryMB: 128, Status: "timeout", ErrorType: "Sandbox.Timedout"}.Line()
	want = "REPORT RequestId: r\tDuration: 3000.00 ms\tBilled Duration: 3000 ms\tMemory Size: 128 MB\tMax Memory Used: 0 MB\tStatus: timeout\tError Type: Sandbox.Timedout\n"
	if got != want {
		t.Fatalf("got  %q\nwant %q", got, want)
	}
	got = Report{RequestID: "r", Duration: time.Millisecond, MemoryMB: 128, MaxMemoryMB: 20, RestoreDuration: 35200 * time.Microsecond}.Line()
	want = "REPORT RequestId: r\tDuration: 1.00 ms\tBilled Duration: 1 ms\tMemory Size: 128 MB\tMax Memory Used: 20 MB\tRestore Duration: 35.20 ms\tBilled Restore Duration: 36 ms\n"
	if got != want {
		t.Fatalf("got  %q\nwant %q", got, want)
	}
	if BilledMillis(0) != 1 || BilledMillis(time.Millisecond) != 1 || BilledMillis(time.Millisecond+1) != 2 {
		t.Fatal("billed duration rounding")
	}
	if StartLine("r", "$LATEST") != "START RequestId: r Version: $LATEST\n" || EndLine("r") != "END RequestId: r\n" {
		t.Fatal("START/END lines")
	}
}
