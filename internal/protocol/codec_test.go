package protocol

import (
	"encoding/json"
	"math"
	"reflect"
	"testing"
	"time"
)

var codecStrings = []string{
	"", "r-1", "arn:aws:lambda:us-east-1:000000000000:function:f", `{"custom":{"k":"v"}}`,
	`quote " backslash \ slash /`, "<html>&amp;", "tab\tnewline\n\x00\x1f\x7f", "héllo ✓ 😀", "bad\xffutf8",
	"Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1",
}

func codecValues() []any {
	var vs []any
	for _, s := range codecStrings {
		vs = append(vs,
			Invoke{RequestID: s, DeadlineUnixMs: 1700000000123, FunctionARN: s},
			Invoke{RequestID: "id", FunctionARN: "a", TraceID: s, ClientContext: s, CognitoIdentity: s, HostUnixNano: 1795659277098123456},
			Result{RequestID: s, FunctionError: s, ErrorType: s, PayloadLen: 7, LogBytes: 300,
				Duration: 1234567, InitDuration: 5 * time.Millisecond, RestoreDuration: 7 * time.Millisecond, MaxMemoryMB: 21, Reset: true},
		)
	}
	return append(vs,
		Invoke{}, Result{},
		Invoke{RequestID: "x", DeadlineUnixMs: math.MinInt64},
		Result{RequestID: "x", PayloadLen: -1, LogBytes: math.MaxInt64, Duration: math.MinInt64, MaxMemoryMB: math.MaxInt32},
	)
}

// ptrTo returns a pointer to a zero value of v's type.
func ptrTo(v any) any { return reflect.New(reflect.TypeOf(v)).Interface() }

// The fast encoder writes what encoding/json reads back as encoding/json's
// own encoding would be read, and the fast decoder reads encoding/json's
// encoding as encoding/json does.
func TestCodecAgreesWithEncodingJSON(t *testing.T) {
	for _, v := range codecValues() {
		std, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		want := ptrTo(v)
		if err := json.Unmarshal(std, want); err != nil {
			t.Fatal(err)
		}

		fast, err := appendHeader(nil, v)
		if err != nil {
			t.Fatal(err)
		}
		got := ptrTo(v)
		if err := json.Unmarshal(fast, got); err != nil {
			t.Fatalf("%+v: fast encoding %s is not JSON: %v", v, fast, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("fast encoding %s decodes to %+v, want %+v", fast, got, want)
		}

		got = ptrTo(v)
		if err := decodeHeader(std, got); err != nil {
			t.Fatalf("decoding %s: %v", std, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("fast decoding of %s = %+v, want %+v", std, got, want)
		}
	}
}

// What the fast encoder writes for ordinary headers, the fast decoder
// reads without falling back.
func TestFastPathCoversOrdinaryHeaders(t *testing.T) {
	inv := Invoke{RequestID: "8f2c1d3e-1111-4a5b-9c8d-0123456789ab", DeadlineUnixMs: 1700000003000,
		FunctionARN: "arn:aws:lambda:us-east-1:000000000000:function:echo", TraceID: "Root=1-abc;Sampled=0"}
	var gotInv Invoke
	if !gotInv.decodeFast(inv.appendJSON(nil)) || gotInv != inv {
		t.Fatalf("Invoke fast path: %+v", gotInv)
	}
	res := Result{RequestID: inv.RequestID, FunctionError: "Unhandled", ErrorType: "Runtime.ExitError", PayloadLen: 12,
		LogBytes: 321, Duration: 812345, InitDuration: 4 * time.Millisecond, MaxMemoryMB: 19, Reset: true}
	var gotRes Result
	if !gotRes.decodeFast(res.appendJSON(nil)) || gotRes != res {
		t.Fatalf("Result fast path: %+v", gotRes)
	}
}

// Headers outside the fast path decode exactly as encoding/json decodes
// them, errors included, into a value that already holds fields.
func TestDecodeFallsBackLikeEncodingJSON(t *testing.T) {
	inputs := []string{
		`{"RequestID":"a\"b","PayloadLen":1}`,
		`{"RequestID":"\u00e9"}`,
		`{"RequestID":"é"}`,
		`{"RequestID":null,"Duration":5}`,
		`{"Duration":1.5}`, `{"Duration":1e3}`, `{"Duration":-0}`, `{"Duration":01}`, `{"Duration":+1}`,
		`{"Duration":99999999999999999999}`, `{"PayloadLen":"3"}`, `{"Reset":1}`, `{"Reset":false}`,
		`{"RequestID":"a","RequestID":"b"}`,
		`{"requestid":"lower"}`, `{"Unknown":{"x":[1,2]},"RequestID":"r"}`,
		` { "RequestID" : "r" , "MaxMemoryMB" : 3 } `,
		`{}`, `{`, `{"RequestID":"r"}x`, `[]`, ``, `null`, `{"RequestID":"r",}`, `{"RequestID" "r"}`,
		`{"DeadlineUnixMs":-9223372036854775808}`, `{"DeadlineUnixMs":9223372036854775808}`,
		`{"TraceID":"t","ClientContext":"{\"a\":1}"}`,
	}
	for _, in := range inputs {
		for _, seed := range []any{
			&Result{RequestID: "old", PayloadLen: 9, Reset: true, Duration: 7},
			&Invoke{RequestID: "old", DeadlineUnixMs: 9, TraceID: "old-trace"},
		} {
			want := reflect.New(reflect.TypeOf(seed).Elem())
			want.Elem().Set(reflect.ValueOf(seed).Elem())
			got := reflect.New(reflect.TypeOf(seed).Elem())
			got.Elem().Set(reflect.ValueOf(seed).Elem())
			wantErr := json.Unmarshal([]byte(in), want.Interface())
			gotErr := decodeHeader([]byte(in), got.Interface())
			if (wantErr == nil) != (gotErr == nil) {
				t.Errorf("%T %s: error %v, encoding/json's %v", seed, in, gotErr, wantErr)
				continue
			}
			if wantErr == nil && !reflect.DeepEqual(got.Interface(), want.Interface()) {
				t.Errorf("%T %s: %+v, encoding/json gives %+v", seed, in, got.Elem(), want.Elem())
			}
		}
	}
}

func FuzzDecodeHeaderAgreesWithEncodingJSON(f *testing.F) {
	for _, v := range codecValues() {
		b, _ := appendHeader(nil, v)
		f.Add(b)
	}
	f.Add([]byte(`{"Reset":true,"InitDuration":12,"RequestID":"x"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var wantR, gotR Result
		wantErr, gotErr := json.Unmarshal(data, &wantR), decodeHeader(data, &gotR)
		if (wantErr == nil) != (gotErr == nil) || wantErr == nil && gotR != wantR {
			t.Fatalf("Result %q: %+v %v, encoding/json: %+v %v", data, gotR, gotErr, wantR, wantErr)
		}
		var wantI, gotI Invoke
		wantErr, gotErr = json.Unmarshal(data, &wantI), decodeHeader(data, &gotI)
		if (wantErr == nil) != (gotErr == nil) || wantErr == nil && gotI != wantI {
			t.Fatalf("Invoke %q: %+v %v, encoding/json: %+v %v", data, gotI, gotErr, wantI, wantErr)
		}
	})
}

// Headers of other types still go through encoding/json.
func TestOtherHeadersUseEncodingJSON(t *testing.T) {
	in := Init{FunctionName: "f", Command: []string{"/var/task/bootstrap"}, Env: []string{"A=b"}, UID: 993}
	b, err := appendHeader(nil, in)
	if err != nil {
		t.Fatal(err)
	}
	var out Init
	if err := decodeHeader(b, &out); err != nil || !reflect.DeepEqual(in, out) {
		t.Fatalf("Init round trip: %+v %v", out, err)
	}
	if _, err := appendHeader(nil, func() {}); err == nil {
		t.Fatal("an unencodable header was accepted")
	}
}
