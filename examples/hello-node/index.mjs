// hello-node: the smallest InvokeX function for a nodejs runtime.
//
// Handler: index.handler (an ES module). Event {"name":"x"} -> {"message":"Hello, x!"}.

export const handler = async (event, context) => {
  const name = event?.name || 'world';
  // console output lands in the invocation's log, tagged with the request id.
  console.log(`greeting ${name}`);
  return { message: `Hello, ${name}!` };
};
