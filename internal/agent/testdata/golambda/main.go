// Command golambda is a real aws-lambda-go function the agent's tests run
// as a runtime (built as "bootstrap", like a provided.al2023 function).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/aws/aws-lambda-go/lambda"
	"github.com/aws/aws-lambda-go/lambdacontext"
)

// event tells the function what to do.
type event struct {
	Do   string `json:"do"`
	Text string `json:"text,omitempty"`
	N    int    `json:"n,omitempty"`
}

type response struct {
	RequestID string `json:"requestId"`
	Text      string `json:"text,omitempty"`
	Size      int    `json:"size,omitempty"`
	Data      string `json:"data,omitempty"`
}

func handle(ctx context.Context, ev event) (response, error) {
	lc, _ := lambdacontext.FromContext(ctx)
	switch ev.Do {
	case "echo":
		return response{RequestID: lc.AwsRequestID, Text: ev.Text}, nil
	case "print":
		fmt.Println("golambda says " + ev.Text)
		fmt.Fprintln(os.Stderr, "golambda warns "+ev.Text)
		return response{RequestID: lc.AwsRequestID, Text: ev.Text}, nil
	case "fail":
		return response{}, errors.New("handled failure: " + ev.Text)
	case "panic":
		panic("golambda panics")
	case "big":
		return response{Data: strings.Repeat("x", ev.N)}, nil
	}
	return response{}, fmt.Errorf("unknown action %q", ev.Do)
}

func main() {
	fmt.Println("golambda cold start")
	lambda.Start(handle)
}
