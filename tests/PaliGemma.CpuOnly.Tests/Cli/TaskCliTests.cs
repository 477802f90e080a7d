using System.Text.Json;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Tasks;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Tasks;
using PaliGemma.CpuOnly.Tests.Tensors;

namespace PaliGemma.CpuOnly.Tests.Cli;

/// <summary>
/// The task commands (caption, answer, detect, segment, ocr, decode-output, batch) on the tiny random-weight checkpoint:
/// its outputs are noise, so these check the plumbing, the JSON shape and the pictures, not the answers.
/// </summary>
[Collection(nameof(ConsoleCollection))]
public sealed class TaskCliTests : IDisposable
{
    private static readonly string Model = Path.Combine(TestPaths.Golden, "tiny-mqa-56");
    private static readonly string Image = Path.Combine(Model, "gray_200x150.png");
    private static readonly string Vae = Path.Combine(TestPaths.Golden, "segmentation", "vae.npz");
    private readonly string _dir = Path.Combine(Path.GetTempPath(), $"pg-task-cli-{Guid.NewGuid():N}");

    public TaskCliTests() => Directory.CreateDirectory(_dir);

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static JsonElement RunJson(params string[] args)
    {
        var (code, stdout, stderr) = CliTests.Run([.. args, "--json", "--quiet"]);
        Assert.True(code == 0, $"exit {code}: {stderr}");
        Assert.Equal("", stderr);
        return JsonDocument.Parse(stdout).RootElement.Clone();
    }

    /// <summary>The task command must send exactly the prompt generate would: same ids for the built prompt.</summary>
    private static void AssertSameAsGenerate(JsonElement task, string prompt, int maxNewTokens)
    {
        var generate = RunJson("generate", "--model", Model, "--image", Image, "--prompt", prompt, "--max-new-tokens", maxNewTokens.ToString());
        Assert.Equal(prompt, task.GetProperty("prompt").GetString());
        Assert.Equal(Ids(generate), Ids(task));
        Assert.Equal(generate.GetProperty("text").GetString(), task.GetProperty("text").GetString());
    }

    [Fact]
    public void Caption_and_answer_build_the_prompt_and_print_the_text()
    {
        var caption = RunJson("caption", "--model", Model, "--image", Image, "--lang", "de", "--max-new-tokens", "5");
        Assert.Equal("caption", caption.GetProperty("task").GetString());
        Assert.False(caption.TryGetProperty("objects", out _));
        Assert.Equal(200, caption.GetProperty("image_size").GetProperty("width").GetInt32());
        var timings = caption.GetProperty("timings_ms");
        foreach (var key in new[] { "load", "preprocess", "vision", "prefill", "decode", "masks", "total" }) Assert.True(timings.GetProperty(key).GetDouble() >= 0, key);
        AssertSameAsGenerate(caption, "caption de", 5);

        var answer = RunJson("answer", "--model", Model, "--image", Image, "--question", "what is this?", "--max-new-tokens", "4");
        Assert.Equal("answer", answer.GetProperty("task").GetString());
        AssertSameAsGenerate(answer, "answer en what is this?", 4);

        var (code, stdout, _) = CliTests.Run("ocr", "--model", Model, "--image", Image, "--max-new-tokens", "3", "--quiet");
        Assert.Equal(0, code);
        var ocr = RunJson("ocr", "--model", Model, "--image", Image, "--max-new-tokens", "3");
        Assert.Equal(ocr.GetProperty("text").GetString() + Environment.NewLine, stdout);
    }

    [Fact]
    public void Detect_prints_objects_json_and_writes_an_annotated_png_of_the_input_size()
    {
        string png = Path.Combine(_dir, "detect.png");
        var detect = RunJson("detect", "--model", Model, "--image", Image, "--object", "cat ; dog", "--max-new-tokens", "6", "--annotate", png);
        Assert.Equal("detect", detect.GetProperty("task").GetString());
        Assert.Equal(JsonValueKind.Array, detect.GetProperty("objects").ValueKind);
        Assert.Equal(png, detect.GetProperty("annotated").GetString());
        AssertSameAsGenerate(detect, "detect cat ; dog", 6);
        // The objects are whatever the random model's text parses to.
        var expected = OutputParser.Parse(detect.GetProperty("text").GetString()!, 200, 150);
        Assert.Equal(expected.Count, detect.GetProperty("objects").GetArrayLength());
        var annotated = ImageLoader.Load(png);
        Assert.Equal((200, 150), (annotated.Width, annotated.Height));
    }

    [Fact]
    public void Segment_without_a_usable_vae_fails_with_one_line_and_the_download_hint()
    {
        string hint = TaskSupportHint();
        foreach (var extra in new[] { Array.Empty<string>(), ["--vae", Path.Combine(_dir, "missing-vae.npz")] })
        {
            var (code, stdout, stderr) = CliTests.Run(["segment", "--model", Model, "--image", Image, "--object", "cat", "--quiet", .. extra]);
            Assert.Equal(1, code);
            Assert.Equal("", stdout);
            Assert.Single(stderr.TrimEnd().Split('\n'));
            Assert.Contains(hint, stderr);
            if (extra.Length > 0) Assert.Contains("missing-vae.npz", stderr);
        }
    }

    private static int[] Ids(JsonElement result) => result.GetProperty("generated_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();

    private static string TaskSupportHint() => MaskDecoder.DownloadHint.ReplaceLineEndings(" ").Trim();

    /// <summary>Needs the masks helper's MaskDecoder.</summary>
    [Fact]
    public void Segment_with_the_vae_runs_end_to_end()
    {
        string png = Path.Combine(_dir, "segment.png");
        var segment = RunJson("segment", "--model", Model, "--image", Image, "--object", "cat", "--vae", Vae, "--max-new-tokens", "6", "--annotate", png);
        Assert.Equal("segment", segment.GetProperty("task").GetString());
        AssertSameAsGenerate(segment, "segment cat", 6);
        Assert.Equal(JsonValueKind.Array, segment.GetProperty("objects").ValueKind);
        var annotated = ImageLoader.Load(png);
        Assert.Equal((200, 150), (annotated.Width, annotated.Height));
    }

    [Fact]
    public void Decode_output_json_gives_the_parse_case_boxes()
    {
        const string raw = "<loc0261><loc0566><loc0578><loc0607> person ; <loc0221><loc0227><loc0539><loc0459> cat";
        var root = RunJson("decode-output", "--text", raw, "--width", "362", "--height", "298");
        Assert.Equal(raw, root.GetProperty("text").GetString());
        var objects = root.GetProperty("objects").EnumerateArray().ToArray();
        Assert.Equal(2, objects.Length);
        Assert.Equal("person", objects[0].GetProperty("label").GetString());
        Assert.Equal("cat", objects[1].GetProperty("label").GetString());
        double[] box = objects[0].GetProperty("box_xyxy").EnumerateArray().Select(e => e.GetDouble()).ToArray();
        double[] expected = [566 / 1023.0 * 362, 261 / 1023.0 * 298, 607 / 1023.0 * 362, 578 / 1023.0 * 298];
        Assert.Equal(expected, box);
        Assert.Equal(new[] { 261, 566, 578, 607 }, objects[0].GetProperty("loc_y1x1y2x2").EnumerateArray().Select(e => e.GetInt32()));
        Assert.Equal(JsonValueKind.Null, objects[0].GetProperty("seg").ValueKind);
        Assert.Equal(JsonValueKind.Null, objects[0].GetProperty("mask").ValueKind);
        Assert.Equal(4, objects[1].GetProperty("box_xyxy_div1024").GetArrayLength());
        Assert.Equal(4, objects[1].GetProperty("normalized_y1x1y2x2").GetArrayLength());

        var (code, stdout, _) = CliTests.Run("decode-output", "--text", raw, "--width", "362", "--height", "298");
        Assert.Equal(0, code);
        var lines = stdout.TrimEnd().Split(Environment.NewLine);
        Assert.Equal(2, lines.Length);
        Assert.StartsWith("person: x1=200.3 y1=76.0 x2=214.8 y2=168.4", lines[0]);
    }

    [Fact]
    public void Decode_output_annotates_a_picture_with_coloured_outlines()
    {
        string png = Path.Combine(_dir, "boxes.png");
        const string raw = "<loc0200><loc0100><loc0800><loc0900> cat";
        var root = RunJson("decode-output", "--text", raw, "--annotate-image", Image, "--out", png);
        Assert.Equal(200, root.GetProperty("image_size").GetProperty("width").GetInt32());
        var input = ImageLoader.Load(Image);
        var output = ImageLoader.Load(png);
        Assert.Equal((input.Width, input.Height), (output.Width, output.Height));
        var box = OutputParser.Parse(raw, 200, 150)[0].BoxXyxy;
        int x1 = (int)Math.Floor(box[0]), ymid = (int)((box[1] + box[3]) / 2), xmid = (int)((box[0] + box[2]) / 2);
        Assert.Equal(ResultAnnotator.ColorOf(0), AnnotationTests.Pixel(output, x1, ymid));
        Assert.Equal(ResultAnnotator.ColorOf(0), AnnotationTests.Pixel(output, x1 + 1, ymid));
        Assert.Equal(AnnotationTests.Pixel(input, xmid, ymid), AnnotationTests.Pixel(output, xmid, ymid)); // no mask: inside untouched
    }

    /// <summary>Needs the masks helper's MaskDecoder: the RLE must decode to big_vision's full mask.</summary>
    [Fact]
    public void Decode_output_with_the_vae_gives_the_golden_full_mask_as_rle_and_tints_it()
    {
        string dir = Path.Combine(TestPaths.Golden, "segmentation");
        using var cases = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "mask_cases.json")));
        var maskCase = cases.RootElement.GetProperty("cases")[0];
        var b = maskCase.GetProperty("boxes")[0];
        Assert.Equal(0, b.GetProperty("box_float_pixels_within_1em5_of_zero").GetInt32()); // no threshold ties in this box
        int w = b.GetProperty("image_width").GetInt32(), h = b.GetProperty("image_height").GetInt32();
        string raw = b.GetProperty("loc_string").GetString() + maskCase.GetProperty("seg_string").GetString() + " blob";

        var root = RunJson("decode-output", "--text", raw, "--width", w.ToString(), "--height", h.ToString(), "--vae", Vae);
        var o = Assert.Single(root.GetProperty("objects").EnumerateArray());
        var mask = o.GetProperty("mask");
        Assert.Equal(new[] { h, w }, mask.GetProperty("size").EnumerateArray().Select(e => e.GetInt32()));
        int[] counts = mask.GetProperty("counts").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        byte[] full = MaskRle.Decode(counts, w, h);
        byte[] golden = Npy.Read(Path.Combine(dir, b.GetProperty("full_mask_file").GetString()!)).ToUInt8();
        Assert.Equal(golden, full);
        Assert.Equal(b.GetProperty("full_true_pixels").GetInt32(), mask.GetProperty("area").GetInt32());

        // Annotate a flat picture of that size: mask pixels away from the outline are tinted, pixels outside the box are not.
        string picture = Path.Combine(_dir, "flat.png");
        ResultAnnotator.SavePng(AnnotationTests.Gray(w, h, 128), picture);
        string png = Path.Combine(_dir, "mask.png");
        var (code, _, stderr) = CliTests.Run("decode-output", "--text", raw, "--vae", Vae, "--annotate-image", picture, "--out", png);
        Assert.True(code == 0, stderr);
        var output = ImageLoader.Load(png);
        Assert.Equal((w, h), (output.Width, output.Height));
        var pb = b.GetProperty("pixel_box_x1y1x2y2").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        int tinted = 0;
        for (int y = pb[1] + 3; y < pb[3] - 3; y++)
            for (int x = pb[0] + 3; x < pb[2] - 3; x++)
            {
                bool changed = AnnotationTests.Pixel(output, x, y) != (128, 128, 128);
                Assert.Equal(golden[y * w + x] != 0, changed);
                tinted += changed ? 1 : 0;
            }
        Assert.True(tinted > 0);
        Assert.Equal((128, 128, 128), AnnotationTests.Pixel(output, w - 1, h - 1));
    }

    [Fact]
    public void Batch_runs_every_line_keeps_going_past_bad_ones_and_reports_progress()
    {
        File.Copy(Image, Path.Combine(_dir, "picture.png"));
        string input = Path.Combine(_dir, "jobs.jsonl");
        File.WriteAllLines(input,
        [
            """{"image": "picture.png", "prompt": "caption en", "max_new_tokens": 3}""",
            """{"image": "picture.png", "task": "detect", "objects": "cat ; dog", "max_new_tokens": 3}""",
            "this is not json",
            "",
            """{"image": "missing.png", "task": "ocr"}""",
            """{"image": "picture.png", "task": "answer"}""",
            """{"image": "picture.png", "task": "segment", "objects": ["cat"]}""",
            """{"image": "picture.png", "task": "answer", "question": "why?", "max_new_tokens": 2}""",
        ]);
        string output = Path.Combine(_dir, "results.jsonl");
        var (code, stdout, stderr) = CliTests.Run("batch", "--model", Model, "--input", input, "--output", output, "--max-new-tokens", "4");
        Assert.Equal(1, code);   // some lines failed
        Assert.Equal("", stdout);
        Assert.Contains("7/7 lines", stderr);
        Assert.Contains("ETA", stderr);
        Assert.Contains("4 of 7 lines failed", stderr);

        var results = File.ReadAllLines(output).Select(l => JsonDocument.Parse(l).RootElement.Clone()).ToArray();
        Assert.Equal(new[] { 1, 2, 3, 5, 6, 7, 8 }, results.Select(r => r.GetProperty("line").GetInt32()));
        Assert.Equal("caption en", results[0].GetProperty("prompt").GetString());
        Assert.InRange(results[0].GetProperty("generated_ids").GetArrayLength(), 1, 3);   // the line's max_new_tokens wins
        Assert.Equal("detect cat ; dog", results[1].GetProperty("prompt").GetString());
        Assert.Equal(JsonValueKind.Array, results[1].GetProperty("objects").ValueKind);
        Assert.Contains("JSON", results[2].GetProperty("error").GetString());
        Assert.Contains("missing.png", results[3].GetProperty("error").GetString());
        Assert.Contains("question", results[4].GetProperty("error").GetString());
        Assert.Contains("--vae", results[5].GetProperty("error").GetString());
        Assert.Equal("answer en why?", results[6].GetProperty("prompt").GetString());
        Assert.True(results[6].GetProperty("generated_ids").GetArrayLength() <= 2);
        foreach (int i in new[] { 0, 1, 6 }) Assert.False(results[i].TryGetProperty("error", out _));

        // The same ids as a single run of the same prompt: the batch shares one model load but not state.
        var single = RunJson("caption", "--model", Model, "--image", Image, "--max-new-tokens", "3");
        Assert.Equal(Ids(single), Ids(results[0]));
    }

    [Fact]
    public void Batch_writes_to_stdout_by_default()
    {
        File.Copy(Image, Path.Combine(_dir, "picture.png"));
        string input = Path.Combine(_dir, "one.jsonl");
        File.WriteAllText(input, """{"image": "picture.png", "task": "ocr", "max_new_tokens": 2}""" + "\n");
        var (code, stdout, _) = CliTests.Run("batch", "--model", Model, "--input", input, "--quiet");
        Assert.Equal(0, code);
        var line = Assert.Single(stdout.TrimEnd().Split('\n'));
        Assert.Equal("ocr", JsonDocument.Parse(line).RootElement.GetProperty("prompt").GetString());
    }

    [Theory]
    [InlineData("detect", "--model", "m", "--image", "x.png")]                                   // no --object
    [InlineData("detect", "--model", "m", "--image", "x.png", "--object", "cat ;; dog")]          // empty name
    [InlineData("answer", "--model", "m", "--image", "x.png")]                                   // no --question
    [InlineData("caption", "--model", "m", "--image", "x.png", "--annotate", "o.png")]            // not a box task
    [InlineData("caption", "--model", "m", "--image", "x.png", "--lang", "e n")]
    [InlineData("detect", "--model", "m", "--image", "x.png", "--object", "cat", "--annotate", "o.jpg")]
    [InlineData("decode-output", "--text", "<loc0001>")]                                         // no size
    [InlineData("decode-output", "--text", "t", "--width", "10", "--height", "10", "--out", "o.png")]
    [InlineData("batch", "--model", "m")]
    public void Bad_task_arguments_give_one_line_and_exit_code_2(params string[] args)
    {
        var (code, stdout, stderr) = CliTests.Run(args);
        Assert.Equal(2, code);
        Assert.Equal("", stdout);
        Assert.Single(stderr.TrimEnd().Split('\n'));
        Assert.StartsWith("paligemma: ", stderr);
    }

    [Fact]
    public void Help_lists_the_task_commands()
    {
        var (code, stdout, _) = CliTests.Run("help");
        Assert.Equal(0, code);
        foreach (var command in new[] { "caption", "answer", "detect", "segment", "ocr", "decode-output", "batch", "--annotate", "--vae", "RLE" })
            Assert.Contains(command, stdout);
    }
}
